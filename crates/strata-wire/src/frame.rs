//! Framing: encoding headers and a sans-IO decoder for byte streams.

use crate::{Header, PROTOCOL_VERSION, WireError};

/// Size limits enforced before a frame is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest header in bytes.
    pub header_bytes_max: u32,
    /// Largest payload in bytes.
    pub frame_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self { header_bytes_max: 64 << 10, frame_bytes_max: 1 << 30 }
    }
}

/// Appends the length prefix and MessagePack encoding of `header` to `out`.
pub fn encode_frame_header(header: &Header, out: &mut Vec<u8>) -> Result<(), WireError> {
    let start = out.len();
    out.extend_from_slice(&[0; 4]);
    rmp_serde::encode::write_named(out, header).map_err(|e| WireError::Encode(e.to_string()))?;
    let len = u32::try_from(out.len() - start - 4).map_err(|_| WireError::Encode("header over 4 GiB".into()))?;
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

/// The length prefix and encoded header of `header` as a new buffer.
pub fn frame_header_bytes(header: &Header) -> Result<Vec<u8>, WireError> {
    let mut v = Vec::with_capacity(64);
    encode_frame_header(header, &mut v)?;
    Ok(v)
}

/// What the decoder found in the bytes fed to it.
#[derive(Debug, PartialEq)]
#[allow(clippy::large_enum_variant, reason = "one header per frame; boxing it would allocate on every frame")]
pub enum Event<'a> {
    /// A complete, validated header; its payload follows.
    Header(Header),
    /// Payload bytes, borrowed from the input (never copied by the decoder).
    Payload(&'a [u8]),
    /// The current frame is complete.
    End,
}

#[derive(Debug)]
enum State {
    Len { got: [u8; 4], n: usize },
    Head { len: usize, buf: Vec<u8> },
    Payload { remaining: u64 },
    End,
}

/// Incremental frame decoder for a byte stream that may carry several frames.
///
/// Feed it any split of the stream; it consumes what it can and reports at most one
/// event per call. After an error the stream must be abandoned.
#[derive(Debug)]
pub struct FrameDecoder {
    limits: Limits,
    state: State,
}

impl FrameDecoder {
    /// A decoder enforcing `limits`.
    pub fn new(limits: Limits) -> Self {
        Self { limits, state: State::Len { got: [0; 4], n: 0 } }
    }

    /// Whether the decoder sits between frames (a stream may end here).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Len { n: 0, .. })
    }

    /// Checks that the stream ended between frames.
    pub fn finish(&self) -> Result<(), WireError> {
        match &self.state {
            State::Len { n: 0, .. } => Ok(()),
            State::Len { n, .. } => Err(WireError::Truncated { missing: (4 - n) as u64 }),
            State::Head { len, buf } => Err(WireError::Truncated { missing: (len - buf.len()) as u64 }),
            State::Payload { remaining } => Err(WireError::Truncated { missing: *remaining }),
            State::End => Ok(()),
        }
    }

    /// Consumes a prefix of `input`; returns the bytes consumed and an event, if one is
    /// complete. Call again with the rest of the input until it returns `(0, None)`.
    pub fn feed<'a>(&mut self, input: &'a [u8]) -> Result<(usize, Option<Event<'a>>), WireError> {
        match &mut self.state {
            State::End => {
                self.state = State::Len { got: [0; 4], n: 0 };
                Ok((0, Some(Event::End)))
            }
            State::Len { got, n } => {
                let take = (4 - *n).min(input.len());
                got[*n..*n + take].copy_from_slice(&input[..take]);
                *n += take;
                if *n < 4 {
                    return Ok((take, None));
                }
                let len = u32::from_le_bytes(*got);
                if len > self.limits.header_bytes_max {
                    return Err(WireError::HeaderTooLarge {
                        bytes: u64::from(len),
                        limit_bytes: u64::from(self.limits.header_bytes_max),
                    });
                }
                if len == 0 {
                    return Err(WireError::Malformed("empty header".into()));
                }
                self.state = State::Head { len: len as usize, buf: Vec::with_capacity(len as usize) };
                Ok((take, None))
            }
            State::Head { len, buf } => {
                let take = (*len - buf.len()).min(input.len());
                buf.extend_from_slice(&input[..take]);
                if buf.len() < *len {
                    return Ok((take, None));
                }
                let header = decode_header(buf, &self.limits)?;
                self.state = if header.payload_bytes == 0 {
                    State::End
                } else {
                    State::Payload { remaining: header.payload_bytes }
                };
                Ok((take, Some(Event::Header(header))))
            }
            State::Payload { remaining } => {
                if input.is_empty() {
                    return Ok((0, None));
                }
                let take = (*remaining).min(input.len() as u64) as usize;
                *remaining -= take as u64;
                if *remaining == 0 {
                    self.state = State::End;
                }
                Ok((take, Some(Event::Payload(&input[..take]))))
            }
        }
    }
}

/// Decodes and validates one header (without its length prefix).
fn decode_header(bytes: &[u8], limits: &Limits) -> Result<Header, WireError> {
    // Peek at the version first so that a newer peer gets a version error, not a parse error.
    let header: Header = rmp_serde::from_slice(bytes).map_err(|e| match peek_version(bytes) {
        Some(v) if v != PROTOCOL_VERSION => WireError::Version { got: v, supported: PROTOCOL_VERSION },
        _ => WireError::Malformed(e.to_string()),
    })?;
    if header.version != PROTOCOL_VERSION {
        return Err(WireError::Version { got: header.version, supported: PROTOCOL_VERSION });
    }
    if header.payload_bytes > limits.frame_bytes_max {
        return Err(WireError::FrameTooLarge { bytes: header.payload_bytes, limit_bytes: limits.frame_bytes_max });
    }
    header.check_payload()?;
    Ok(header)
}

fn peek_version(bytes: &[u8]) -> Option<u16> {
    #[derive(serde::Deserialize)]
    struct VersionOnly {
        version: u16,
    }
    rmp_serde::from_slice::<VersionOnly>(bytes).ok().map(|v| v.version)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use strata_tensor::{DType, Shape};

    use super::*;
    use crate::{Body, ChunkTag, MemberRecord, MemberState, NodeInfo, TensorMeta};

    /// Feeds `stream` in pieces of `split` bytes; returns headers with their payloads.
    fn decode_all(stream: &[u8], split: usize, limits: Limits) -> Result<Vec<(Header, Vec<u8>)>, WireError> {
        let mut dec = FrameDecoder::new(limits);
        let mut out: Vec<(Header, Vec<u8>)> = Vec::new();
        for piece in stream.chunks(split.max(1)) {
            let mut rest = piece;
            loop {
                let (used, ev) = dec.feed(rest)?;
                rest = &rest[used..];
                match ev {
                    Some(Event::Header(h)) => out.push((h, Vec::new())),
                    Some(Event::Payload(p)) => out.last_mut().expect("payload after header").1.extend_from_slice(p),
                    Some(Event::End) => {}
                    None if rest.is_empty() => break,
                    None => {}
                }
            }
        }
        // Flush a pending End.
        let _ = dec.feed(&[])?;
        dec.finish()?;
        Ok(out)
    }

    fn frame(header: &Header, payload: &[u8]) -> Vec<u8> {
        let mut v = frame_header_bytes(header).unwrap();
        v.extend_from_slice(payload);
        v
    }

    fn info(name: &str) -> NodeInfo {
        NodeInfo { name: name.into(), addr: "127.0.0.1:7000".into(), rank: Some(1), cpus: 2, ..Default::default() }
    }

    fn body_strategy() -> impl Strategy<Value = (Body, Vec<u8>)> {
        prop_oneof![
            (any::<u64>(), 0usize..40).prop_map(|(op, len)| {
                let payload: Vec<u8> = (0..len * 4).map(|i| i as u8).collect();
                (Body::Chunk { op, tag: ChunkTag { step: 3, segment: 1 }, dtype: DType::F32, len: len as u32 }, payload)
            }),
            ("[a-z]{1,12}", 1usize..5, 1usize..5).prop_map(|(mailbox, a, b)| {
                let meta = TensorMeta { dtype: DType::F32, shape: Shape::from([a, b]) };
                let payload = vec![7u8; a * b * 4];
                (Body::Tensor { mailbox, tag: 9, meta }, payload)
            }),
            ("[a-z0-9-]{1,20}", any::<u64>()).prop_map(|(n, seq)| {
                let members = vec![MemberRecord { info: info(&n), state: MemberState::Alive, incarnation: seq }];
                (Body::Heartbeat { seq, info: info(&n), members }, Vec::new())
            }),
            Just((Body::Ack, Vec::new())),
            ("[a-z0-9-]{1,20}", "[a-z]{1,8}")
                .prop_map(|(name, cluster)| (Body::OperatorHello { name, cluster }, Vec::new())),
            ".{0,64}".prop_map(|m| (Body::Error { message: m }, Vec::new())),
        ]
    }

    proptest! {
        #[test]
        fn frames_round_trip_under_any_split(bodies in prop::collection::vec(body_strategy(), 1..6), split in 1usize..64) {
            let mut stream = Vec::new();
            let mut want = Vec::new();
            for (body, payload) in bodies {
                let h = Header::new(body, payload.len() as u64);
                stream.extend_from_slice(&frame(&h, &payload));
                want.push((h, payload));
            }
            let got = decode_all(&stream, split, Limits::default()).unwrap();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), split in 1usize..32) {
            let _ = decode_all(&bytes, split, Limits { header_bytes_max: 256, frame_bytes_max: 1 << 16 });
        }
    }

    #[test]
    fn oversized_frames_are_refused_before_the_payload() {
        let h = Header::new(
            Body::Chunk { op: 1, tag: ChunkTag { step: 0, segment: 0 }, dtype: DType::F32, len: 1 << 20 },
            4 << 20,
        );
        let bytes = frame_header_bytes(&h).unwrap();
        let limits = Limits { header_bytes_max: 1024, frame_bytes_max: 1 << 20 };
        let e = decode_all(&bytes, 7, limits).unwrap_err();
        assert_eq!(e, WireError::FrameTooLarge { bytes: 4 << 20, limit_bytes: 1 << 20 });
        assert_eq!(e.to_string(), "frame payload of 4194304 bytes exceeds the limit of 1048576 bytes");
        let mut huge_len = vec![0u8; 8];
        huge_len[..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(decode_all(&huge_len, 3, limits), Err(WireError::HeaderTooLarge { .. })));
    }

    #[test]
    fn malformed_truncated_and_wrong_version_frames_are_refused() {
        let mut junk = 5u32.to_le_bytes().to_vec();
        junk.extend_from_slice(b"\xc1\xc1\xc1\xc1\xc1");
        assert!(matches!(decode_all(&junk, 4, Limits::default()), Err(WireError::Malformed(_))));

        let h = Header::new(Body::Ack, 0);
        let bytes = frame_header_bytes(&h).unwrap();
        assert!(matches!(
            decode_all(&bytes[..bytes.len() - 1], 4, Limits::default()),
            Err(WireError::Truncated { missing: 1 })
        ));

        let c =
            Header::new(Body::Chunk { op: 1, tag: ChunkTag { step: 0, segment: 0 }, dtype: DType::F32, len: 4 }, 16);
        let full = frame(&c, &[0; 16]);
        assert_eq!(
            decode_all(&full[..full.len() - 3], 5, Limits::default()).unwrap_err(),
            WireError::Truncated { missing: 3 }
        );

        let mut old = Header::new(Body::Ack, 0);
        old.version = 99;
        let e = decode_all(&frame_header_bytes(&old).unwrap(), 64, Limits::default()).unwrap_err();
        assert_eq!(e, WireError::Version { got: 99, supported: PROTOCOL_VERSION });

        let lying =
            Header::new(Body::Chunk { op: 1, tag: ChunkTag { step: 0, segment: 0 }, dtype: DType::F32, len: 4 }, 12);
        let e = decode_all(&frame(&lying, &[0; 12]), 64, Limits::default()).unwrap_err();
        assert_eq!(e.to_string(), "chunk: header describes 16 payload bytes, frame carries 12");
    }

    #[test]
    fn a_tensor_shape_whose_size_overflows_is_refused() {
        // 2^32 * 2^32 elements wrap to 0 in unchecked arithmetic, which an empty payload matches.
        for (shape, payload) in [(Shape::from([1usize << 32, 1 << 32]), 0u64), (Shape::from([1usize << 62, 1]), 0)] {
            let meta = TensorMeta { dtype: DType::F32, shape };
            assert_eq!(meta.bytes(), None);
            let h = Header::new(Body::Tensor { mailbox: "m".into(), tag: 1, meta }, payload);
            let e = decode_all(&frame(&h, &[]), 64, Limits::default()).unwrap_err();
            assert!(matches!(e, WireError::ShapeTooLarge { .. }), "{e:?}");
            assert!(e.to_string().ends_with("is larger than any payload can be"), "{e}");
        }
        let e = Header::new(
            Body::Tensor {
                mailbox: "m".into(),
                tag: 1,
                meta: TensorMeta { dtype: DType::F32, shape: Shape::from([1usize << 32, 1 << 32]) },
            },
            0,
        )
        .check_payload()
        .unwrap_err();
        assert_eq!(e.to_string(), "tensor of shape [4294967296,4294967296] is larger than any payload can be");
        let fine = TensorMeta { dtype: DType::F32, shape: Shape::from([3, 5]) };
        assert_eq!(fine.bytes(), Some(60));
    }

    /// Replays the checked-in corpus of the fuzz target (`corpus/decode/`, grown by
    /// `scripts/fuzz`) through the fuzz target's own check: errors are fine, panics not.
    #[test]
    fn the_fuzz_corpus_replays_without_panics() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/decode");
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        let (mut decoded, mut refused) = (0, 0);
        for path in &inputs {
            let data = std::fs::read(path).unwrap();
            match std::panic::catch_unwind(|| crate::fuzzing::decode_checked(&data)) {
                Ok(Ok(_)) => decoded += 1,
                Ok(Err(_)) => refused += 1,
                Err(_) => panic!("{} makes the decoder panic", path.display()),
            }
        }
        // The corpus holds both kinds; an empty or unreadable one would prove nothing.
        assert!(decoded >= 5 && refused >= 5, "{decoded} inputs decoded, {refused} refused in {}", dir.display());
    }
}
