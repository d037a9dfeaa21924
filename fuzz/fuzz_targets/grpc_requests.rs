//! What arrives over gRPC: any bytes decoded as each request of the three
//! services (and the summaries agents send the controller) either fail to
//! decode or go through the same validation the servers apply, without a
//! panic; what validation accepts is what the servers rely on. The first
//! byte picks the message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use wset_proto::v1 as pb;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 8 {
        0 => {
            if let Ok(r) = pb::WatchSummariesRequest::decode(rest) {
                let _ = wset_agent::stream::Filter::new(r);
            }
        }
        1 => {
            if let Ok(s) = pb::VmSummary::decode(rest)
                && wset_controller::history::check_summary(&s).is_ok()
            {
                assert!(wset_proto::ids::vm_id_ok(&s.vm_id));
                assert!(s.memory_bytes > 0);
            }
        }
        2 => {
            if let Ok(b) = pb::WatchSummariesResponse::decode(rest) {
                for s in &b.summaries {
                    let _ = wset_controller::history::check_summary(s);
                }
                if let Some(h) = &b.host {
                    let _ = wset_proto::ids::host_id_ok(&h.host_id);
                }
            }
        }
        3 => {
            if let Ok(r) = pb::GetVmHistoryRequest::decode(rest) {
                let _ = wset_controller::history::PageToken::decode(&r.page_token);
                let _ = wset_proto::ids::vm_id_ok(&r.vm_id);
            }
        }
        4 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Some(t) = wset_controller::history::PageToken::decode(text)
            {
                // What decodes re-encodes to a token that decodes the same.
                assert_eq!(
                    wset_controller::history::PageToken::decode(&t.encode()),
                    Some(t)
                );
            }
        }
        5 => {
            if let Ok(text) = std::str::from_utf8(rest)
                && let Ok(rule) = text.parse::<wset_serve::authz::Rule>()
            {
                assert!(!rule.identity.is_empty());
                assert!(rule.pattern == "*" || rule.pattern.starts_with('/'));
            }
        }
        6 => {
            let _ = pb::RankHostsRequest::decode(rest);
            let _ = pb::ExplainDecisionRequest::decode(rest);
            let _ = pb::GetHostHistoryRequest::decode(rest);
        }
        _ => {
            let _ = pb::GetSummaryRequest::decode(rest);
            let _ = pb::ListClusterVmsRequest::decode(rest);
            let _ = pb::GetOvercommitRequest::decode(rest);
        }
    }
});
