//! Packet encryption, the CPU cost every byte of a collective pays on top of the copies:
//! AES-128-GCM sealing and opening one QUIC packet's worth of payload (64 KiB, the
//! datagram size on loopback) with aws-lc-rs, the provider Strata's TLS uses, and with
//! ring, the provider it used before, as the reference in the same run. Throughput is in
//! bytes, so criterion's `GiB/s` compares directly. Opening includes copying the sealed
//! packet first (decryption is in place), for both providers alike.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};

const PACKET: usize = 65_507 - 100;
const KEY: [u8; 16] = [7; 16];
const AAD: [u8; 20] = [1; 20];

fn nonce(i: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&i.to_be_bytes());
    n
}

/// Seal and open benchmarks for one provider; both crates spell the API alike, so one
/// body serves them (`$aead` is the crate's `aead` module).
macro_rules! provider {
    ($group:expr, $aead:path, $name:expr) => {{
        use $aead as aead;
        let key = aead::LessSafeKey::new(aead::UnboundKey::new(&aead::AES_128_GCM, &KEY).unwrap());
        let seal = |buf: &mut Vec<u8>, i: u64| {
            key.seal_in_place_separate_tag(aead::Nonce::assume_unique_for_key(nonce(i)), aead::Aad::from(&AAD), buf)
                .unwrap()
        };
        let mut buf = vec![3u8; PACKET];
        let mut i = 0u64;
        $group.bench_function(BenchmarkId::new("seal", $name), |b| {
            b.iter(|| {
                i += 1;
                seal(&mut buf, i)
            })
        });
        let mut sealed = vec![3u8; PACKET];
        let tag = seal(&mut sealed, 0);
        sealed.extend_from_slice(tag.as_ref());
        $group.bench_function(BenchmarkId::new("open", $name), |b| {
            b.iter(|| {
                let mut packet = sealed.clone();
                let nonce = aead::Nonce::assume_unique_for_key(nonce(0));
                key.open_in_place(nonce, aead::Aad::from(&AAD), &mut packet).unwrap().len()
            })
        });
    }};
}

fn aead(c: &mut Criterion) {
    let mut group = c.benchmark_group("aes-128-gcm 64 KiB packet");
    group.throughput(Throughput::Bytes(PACKET as u64));
    provider!(group, aws_lc_rs::aead, "aws-lc-rs");
    provider!(group, ring::aead, "ring (reference)");
    group.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
