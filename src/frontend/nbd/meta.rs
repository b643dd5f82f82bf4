//! Metadata context queries (`NBD_OPT_LIST_META_CONTEXT`,
//! `NBD_OPT_SET_META_CONTEXT`). The only context is `base:allocation`.
//!
//! Rules (from the NBD protocol):
//! 1. A query is `namespace:leaf` with a non-empty namespace; one that is
//!    not UTF-8 or has no namespace is invalid (`NBD_REP_ERR_INVALID`).
//! 2. Queries in other namespaces, and unknown leaves in `base:`, select
//!    nothing; they are not errors.
//! 3. `base:` (empty leaf) lists every `base:` context but selects none.
//! 4. Listing with no query lists every context; setting with no query
//!    selects none.

use super::codec::BadOption;
use super::protocol::META_BASE_ALLOCATION;

/// Whether `query` names `base:allocation` when listing (`listing`) or
/// selecting contexts.
pub fn names_allocation(query: &[u8], listing: bool) -> Result<bool, BadOption> {
    let query =
        std::str::from_utf8(query).map_err(|_| BadOption("metadata context query is not UTF-8"))?;
    match query.split_once(':') {
        Some(("", _)) => Err(BadOption("metadata context query has an empty namespace")),
        None => Err(BadOption("metadata context query has no namespace")),
        Some(("base", "")) => Ok(listing),
        Some(_) => Ok(query == META_BASE_ALLOCATION),
    }
}

/// Whether a request with `queries` lists (or selects) `base:allocation`.
/// Every query is checked, so an invalid one fails the request even when
/// another matched.
pub fn selects_allocation(queries: &[Vec<u8>], listing: bool) -> Result<bool, BadOption> {
    if queries.is_empty() {
        return Ok(listing);
    }
    let mut any = false;
    for q in queries {
        any |= names_allocation(q, listing)?;
    }
    Ok(any)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_select_only_base_allocation() {
        for (q, list, set) in [
            ("base:allocation", true, true),
            ("base:", true, false),
            ("base:other", false, false),
            ("qemu:dirty-bitmap:x", false, false),
            ("x-mine:allocation", false, false),
            ("base:allocation:more", false, false),
        ] {
            assert_eq!(names_allocation(q.as_bytes(), true), Ok(list), "{q}");
            assert_eq!(names_allocation(q.as_bytes(), false), Ok(set), "{q}");
        }
        for bad in [&b"allocation"[..], b":allocation", b"", &[0xff, b':']] {
            assert!(names_allocation(bad, true).is_err(), "{bad:?}");
        }
        assert_eq!(selects_allocation(&[], true), Ok(true));
        assert_eq!(selects_allocation(&[], false), Ok(false));
        let qs = |v: &[&str]| v.iter().map(|q| q.as_bytes().to_vec()).collect::<Vec<_>>();
        assert_eq!(
            selects_allocation(&qs(&["qemu:x", "base:allocation"]), false),
            Ok(true)
        );
        assert!(selects_allocation(&qs(&["base:allocation", "nocolon"]), false).is_err());
    }
}
