//! The controller's history block codec (`store::codec`): any bytes read
//! as a stored block, of VM points or of host points (the first byte
//! picks), either fail with an error that names the kind of point or
//! decode; what decodes has as many points as the block's framing says,
//! reads the same through the planner's narrow `PlanPoint`, and encodes
//! again to a compressed block that decodes to the same points.
//!
//! A zstd frame that expands past 1 MiB is left out: the codec accepts
//! blocks of up to 256 MiB, and that much of empty frames decodes to
//! gigabytes of default points, the codec's stated bound rather than a
//! fault.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wset_controller::history::PlanPoint;
use wset_controller::store::codec::{ZSTD_MAGIC, block_len, decode_block, encode_block};
use wset_proto::v1 as pb;

/// The most a compressed input may expand to here.
const MAX_EXPANDED: usize = 1 << 20;

/// Decode `block` as points of `M`; on success check the framing count
/// and the round trip through the encoder, compared as encoded bytes (a
/// NaN rate is not equal to itself).
fn check<M: Message + Default>(what: &'static str, block: &[u8]) -> Option<Vec<M>> {
    let points = match decode_block::<M>(what, block) {
        Ok(p) => p,
        Err(e) => {
            assert!(e.to_string().contains(what), "{e}");
            return None;
        }
    };
    assert_eq!(block_len(what, block).expect("decoded, so framed"), points.len());
    let packed = encode_block(what, &points).expect("compress");
    assert!(packed.starts_with(&ZSTD_MAGIC));
    let again = decode_block::<M>(what, &packed).expect("our own block decodes");
    let bytes = |ps: &[M]| ps.iter().map(Message::encode_to_vec).collect::<Vec<_>>();
    assert_eq!(bytes(&points), bytes(&again));
    Some(points)
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, block)) = data.split_first() else {
        return;
    };
    if block.starts_with(&ZSTD_MAGIC) && zstd::bulk::decompress(block, MAX_EXPANDED).is_err() {
        return;
    }
    if which % 2 == 0 {
        let Some(points) = check::<pb::VmHistoryPoint>("VM point", block) else {
            return;
        };
        // The planner's reading of the same block: the same points, its
        // three fields.
        let thin = decode_block::<PlanPoint>("VM point", block).expect("a narrower decode");
        assert_eq!(thin.len(), points.len());
        for (t, p) in thin.iter().zip(&points) {
            assert_eq!(t.timestamp_ms, p.timestamp_ms);
            assert_eq!(t.windows, p.windows);
            assert_eq!(
                t.dirty_rate_bytes_per_s.to_bits(),
                p.dirty_rate_bytes_per_s.to_bits()
            );
        }
    } else {
        check::<pb::HostHistoryPoint>("host point", block);
    }
});
