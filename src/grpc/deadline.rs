//! Honours the caller's `grpc-timeout`: work stops when the caller has stopped waiting, and the
//! answer is DEADLINE_EXCEEDED rather than whatever a half-finished call would produce.

use std::future::Future;
use std::time::Duration;

use tonic::metadata::MetadataMap;

use crate::error::Error;

/// Parses `grpc-timeout` (gRPC over HTTP/2: up to 8 digits and a unit H, M, S, m, u or n).
fn parse(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.saturating_mul(3600)),
        "M" => Duration::from_secs(n.saturating_mul(60)),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The part of the caller's deadline the work may use. The rest is kept back so the
/// DEADLINE_EXCEEDED answer reaches the caller before its own timer fires: tonic's transport
/// (client and server side) turns an expired timer into CANCELLED, which tells the caller less.
fn budget(limit: Duration) -> Duration {
    limit.saturating_sub((limit / 10).min(Duration::from_millis(100)))
}

pub async fn within<T>(
    metadata: &MetadataMap,
    work: impl Future<Output = Result<T, Error>>,
) -> Result<T, Error> {
    match parse(metadata) {
        Some(limit) => tokio::time::timeout(budget(limit), work)
            .await
            .unwrap_or(Err(Error::DeadlineExceeded)),
        None => work.await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(v: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        m
    }

    #[test]
    fn parses_every_unit_and_rejects_junk() {
        assert_eq!(parse(&md("2S")), Some(Duration::from_secs(2)));
        assert_eq!(parse(&md("150m")), Some(Duration::from_millis(150)));
        assert_eq!(parse(&md("1H")), Some(Duration::from_secs(3600)));
        assert_eq!(parse(&md("5M")), Some(Duration::from_secs(300)));
        assert_eq!(parse(&md("10u")), Some(Duration::from_micros(10)));
        assert_eq!(parse(&md("10n")), Some(Duration::from_nanos(10)));
        assert_eq!(parse(&md("10")), None);
        assert_eq!(parse(&md("xS")), None);
        assert_eq!(parse(&md("123456789S")), None);
        assert_eq!(parse(&MetadataMap::new()), None);
    }

    #[test]
    fn budget_keeps_back_a_tenth_up_to_100ms() {
        assert_eq!(budget(Duration::from_secs(1)), Duration::from_millis(900));
        assert_eq!(budget(Duration::from_secs(10)), Duration::from_millis(9900));
        assert_eq!(budget(Duration::from_millis(50)), Duration::from_millis(45));
    }
}
