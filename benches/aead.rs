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

fn aead(c: &mut Criterion) {
    let mut group = c.benchmark_group("aes-128-gcm 64 KiB packet");
    group.throughput(Throughput::Bytes(PACKET as u64));
    {
        use aws_lc_rs::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &KEY).unwrap());
        let mut buf = vec![3u8; PACKET];
        let mut i = 0u64;
        group.bench_function(BenchmarkId::new("seal", "aws-lc-rs"), |b| {
            b.iter(|| {
                i += 1;
                key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&AAD), &mut buf)
                    .unwrap()
            })
        });
        let mut sealed = vec![3u8; PACKET];
        let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&AAD), &mut sealed);
        sealed.extend_from_slice(tag.unwrap().as_ref());
        group.bench_function(BenchmarkId::new("open", "aws-lc-rs"), |b| {
            b.iter(|| {
                let mut packet = sealed.clone();
                key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&AAD), &mut packet).unwrap().len()
            })
        });
    }
    {
        use ring::aead::{AES_128_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
        let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &KEY).unwrap());
        let mut buf = vec![3u8; PACKET];
        let mut i = 0u64;
        group.bench_function(BenchmarkId::new("seal", "ring (reference)"), |b| {
            b.iter(|| {
                i += 1;
                key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(i)), Aad::from(&AAD), &mut buf)
                    .unwrap()
            })
        });
        let mut sealed = vec![3u8; PACKET];
        let tag = key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&AAD), &mut sealed);
        sealed.extend_from_slice(tag.unwrap().as_ref());
        group.bench_function(BenchmarkId::new("open", "ring (reference)"), |b| {
            b.iter(|| {
                let mut packet = sealed.clone();
                key.open_in_place(Nonce::assume_unique_for_key(nonce(0)), Aad::from(&AAD), &mut packet).unwrap().len()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, aead);
criterion_main!(benches);
