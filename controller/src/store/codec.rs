//! The history block codec, pure: how stored records and closed blocks of
//! points are encoded and decoded. No sled, no IO, no clock.
//!
//! A block is its points, each length-delimited (a varint length, then the
//! encoded point), one after another in time order, compressed as one
//! zstd frame. Blocks written before blocks were compressed are the bare
//! frames; they still read, told apart by zstd's magic number. Whatever the
//! bytes, decoding returns an error that names what was damaged, never a
//! panic (`fuzz/fuzz_targets/history_blocks.rs`).

use std::borrow::Cow;
use std::cell::RefCell;

use prost::Message;

/// A stored record or block that does not decode, or a block that cannot be
/// compressed. `what` names the kind of point (`VM point`, `host point`).
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("history store: a stored {what} does not decode ({source}); the store may be damaged")]
    Corrupt {
        what: &'static str,
        source: prost::DecodeError,
    },
    #[error("history store: a stored block of {what}s is cut short; the store may be damaged")]
    CutBlock { what: &'static str },
    #[error(
        "history store: a stored block of {what}s does not decompress ({source}); the store may be damaged"
    )]
    Unpack {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("history store: a block of {what}s could not be compressed ({source})")]
    Pack {
        what: &'static str,
        source: std::io::Error,
    },
}

/// zstd's frame magic. A block that starts with it is compressed; a block
/// written before blocks were compressed is bare frames, whose first byte
/// is a length and whose second is a field tag, never `B5 2F`.
pub const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];

/// zstd's default level: about 3x on a block of history points, at a cost
/// paid once per block when it is packed.
const BLOCK_LEVEL: i32 = 3;

/// The most a block may expand to when read (blocks hold minutes to days
/// of one series, kilobytes to a few megabytes).
const MAX_BLOCK_BYTES: usize = 256 << 20;

thread_local! {
    /// zstd contexts, kept per thread that packs or reads blocks. Making
    /// one allocates about 100 KiB and runs CPUID (a VM exit on a virtual
    /// machine), more than decompressing a minute block takes, and the
    /// planner reads an hour of blocks of every VM for each plan: with a
    /// context per call, that made most of the controller's CPU under the
    /// load test.
    static COMPRESSOR: RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { RefCell::new(None) };
    static DECOMPRESSOR: RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { RefCell::new(None) };
}

/// One stored record (a single point, an event, a VM or host record).
pub fn decode<M: Message + Default>(what: &'static str, v: &[u8]) -> Result<M, CodecError> {
    M::decode(v).map_err(|source| CodecError::Corrupt { what, source })
}

/// A stored block's frames, decompressed if need be.
fn block_bytes<'a>(what: &'static str, v: &'a [u8]) -> Result<Cow<'a, [u8]>, CodecError> {
    if !v.starts_with(&ZSTD_MAGIC) {
        return Ok(Cow::Borrowed(v));
    }
    DECOMPRESSOR
        .with(|d| {
            let mut d = d.borrow_mut();
            let d = match d.as_mut() {
                Some(d) => d,
                None => d.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(v, MAX_BLOCK_BYTES)
        })
        .map(Cow::Owned)
        .map_err(|source| CodecError::Unpack { what, source })
}

/// The framed points of a block's frames, undecoded.
fn frames<'a>(what: &'static str, mut v: &'a [u8]) -> Result<Vec<&'a [u8]>, CodecError> {
    let mut out = Vec::new();
    while !v.is_empty() {
        let len = prost::encoding::decode_varint(&mut v)
            .map_err(|source| CodecError::Corrupt { what, source })?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l <= v.len())
            .ok_or(CodecError::CutBlock { what })?;
        let (frame, rest) = v.split_at(len);
        out.push(frame);
        v = rest;
    }
    Ok(out)
}

/// How many points a stored block holds, without decoding them.
pub fn block_len(what: &'static str, v: &[u8]) -> Result<usize, CodecError> {
    Ok(frames(what, &block_bytes(what, v)?)?.len())
}

/// The points of a stored block, compressed or bare.
pub fn decode_block<M: Message + Default>(
    what: &'static str,
    v: &[u8],
) -> Result<Vec<M>, CodecError> {
    frames(what, &block_bytes(what, v)?)?
        .into_iter()
        .map(|f| decode(what, f))
        .collect()
}

/// Points framed one after another, compressed as one zstd frame.
pub fn encode_block<M: Message>(what: &'static str, points: &[M]) -> Result<Vec<u8>, CodecError> {
    let mut v = Vec::with_capacity(points.iter().map(|p| p.encoded_len() + 4).sum());
    for p in points {
        p.encode_length_delimited(&mut v)
            .expect("a Vec grows as needed");
    }
    COMPRESSOR
        .with(|c| {
            let mut c = c.borrow_mut();
            let c = match c.as_mut() {
                Some(c) => c,
                None => c.insert(zstd::bulk::Compressor::new(BLOCK_LEVEL)?),
            };
            c.compress(&v)
        })
        .map_err(|source| CodecError::Pack { what, source })
}

#[cfg(test)]
mod tests {
    use super::*;
    use wset_proto::v1 as pb;

    fn point(t: u64) -> pb::HostHistoryPoint {
        pb::HostHistoryPoint {
            timestamp_ms: t,
            samples: 1,
            vm_wss_bytes: t * 3,
            ..Default::default()
        }
    }

    /// A block reads back as written, compressed; the same frames bare (a
    /// block from before compression) read the same.
    #[test]
    fn blocks_round_trip_compressed_and_bare() {
        let pts: Vec<_> = (0..100).map(point).collect();
        let v = encode_block("host point", &pts).unwrap();
        assert!(v.starts_with(&ZSTD_MAGIC));
        assert_eq!(
            decode_block::<pb::HostHistoryPoint>("host point", &v).unwrap(),
            pts
        );
        assert_eq!(block_len("host point", &v).unwrap(), 100);
        let mut bare = Vec::new();
        for p in &pts {
            p.encode_length_delimited(&mut bare).unwrap();
        }
        assert_eq!(
            decode_block::<pb::HostHistoryPoint>("host point", &bare).unwrap(),
            pts
        );
        assert!(
            decode_block::<pb::HostHistoryPoint>("host point", &[])
                .unwrap()
                .is_empty()
        );
    }

    /// Damage is an error that names the kind of point, never a panic.
    #[test]
    fn damage_is_named() {
        let v = encode_block("host point", &[point(1), point(2)]).unwrap();
        let e = decode_block::<pb::HostHistoryPoint>("host point", &v[..v.len() - 2]).unwrap_err();
        assert!(matches!(e, CodecError::Unpack { .. }), "{e}");
        let e = block_len("host point", &[0x05, 0x08]).unwrap_err();
        assert!(e.to_string().contains("host points is cut short"), "{e}");
        let e = decode_block::<pb::HostHistoryPoint>("host point", &[0x01, 0xff]).unwrap_err();
        assert!(e.to_string().contains("host point does not decode"), "{e}");
    }
}
