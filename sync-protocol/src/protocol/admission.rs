//! Which edge database may speak for a node: the bridge's rule at `Hello`.
//!
//! A node's database can be restored from a backup, replaced by an empty
//! one (a new disk, a reinstalled ward PC), or copied to a second machine.
//! The first two are takeovers a person chose; the third must be refused,
//! or two databases would sync under one name and each would never receive
//! the other's changes (a feed skips its node's own changes).
//!
//! - Each database has a [`DatabaseId`], minted when it is created and again
//!   when a backup is restored into it. An id the node has not used before
//!   takes the node over; the one it replaces is retired and refused from
//!   then on.
//! - Each welcome hands the database a fresh [`Lease`] (drawn by the
//!   driver), which the edge stores and then confirms (`LeaseHeld`). The
//!   bridge accepts the lease it last offered or the one last confirmed, so
//!   an edge that crashed before storing or confirming its new lease still
//!   gets in. A copy keeps the lease of the moment it was made: once the
//!   original has confirmed a newer one, the copy is refused for good.
//! - While a session of the node is open, another is refused; if the
//!   newcomer held a valid lease (a copy started beside its running
//!   original), the open session takes a new lease at once ([`offer`]), so
//!   the copy stays refused when the original goes offline later.
//!
//! What this cannot tell apart: a copy that connects first, while its
//! original is offline and has not synced since the copy was made, is
//! indistinguishable from the original; it takes the node, and the original
//! is refused when it comes back. Whether a session is open elsewhere is the
//! driver's to tell: each bridge instance knows its own sessions, and the
//! distributed store keeps a presence per node that the instance holding a
//! session renews (so a copy reaching another instance is refused too, and
//! asks that instance's session to renew its lease, at once through Redis,
//! else at the session's next presence renewal). Nothing is lost either way: a refused database keeps its outbox, the
//! refusal is shown at the edge, and a person decides (restore the one to
//! keep with `edge-node restore`, which takes the node over).

use serde::{Deserialize, Serialize};

use crate::wire::{DatabaseId, Lease, RefusalReason, Refused};

/// Databases a node has retired that are still recognised and refused by name.
pub const RETIRED_MAX: usize = 16;

/// What the bridge keeps per node to decide who may speak for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeLease {
    /// The database that speaks for the node.
    pub database: DatabaseId,
    /// The lease the database confirmed holding (`LeaseHeld`); `None`
    /// before its first confirmation.
    pub held: Option<Lease>,
    /// The lease last offered that the database has not confirmed yet.
    pub offered: Option<Lease>,
    /// Databases this node used before, newest last; refused by name.
    pub retired: Vec<DatabaseId>,
}

impl NodeLease {
    /// The newest generation issued for the node.
    fn generation(&self) -> u64 {
        [self.held, self.offered].iter().flatten().map(|lease| lease.generation).max().unwrap_or(0)
    }
}

/// How a hello was admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// The database that already spoke for the node.
    Resumed,
    /// The node's database, showing a lease newer than any the record
    /// knows: the bridge's store was restored from a backup (or lost the
    /// record). Admitted; operators should know.
    Recovered,
    /// A database the node never used: its first, a restore or a new
    /// install. It may lack the node's own changes, so the node's feed sends
    /// them back up to where the log stands now.
    TookOver { replaced: Option<DatabaseId> },
}

/// The hello that asks to be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub database: DatabaseId,
    pub lease: Option<Lease>,
    /// Whether another session of the node is open right now.
    pub connected_elsewhere: bool,
}

/// Decides a hello against the node's record. On admission returns the
/// record to store before the welcome; its `offered` is the new lease (of
/// the next generation, with `nonce`).
///
/// A refusal for `AlreadyConnected` means the claim holds a valid lease, as
/// a copy of the connected database does: the caller then has the open
/// session take a new lease ([`offer`]), so the copy's turns void.
pub fn admit(record: Option<&NodeLease>, claim: Claim, nonce: [u8; 16]) -> Result<(NodeLease, Admission), Refused> {
    let recovered = match record {
        Some(record) => standing(record, claim)?,
        None => false,
    };
    if claim.connected_elsewhere {
        return Err(refused(
            RefusalReason::AlreadyConnected,
            "this node is connected right now through another connection: if a copy of its database runs on \
             another machine, stop it; a dropped connection of this node is closed within the heartbeat timeout"
                .into(),
        ));
    }
    let shown = claim.lease.map_or(0, |lease| lease.generation);
    let generation = record.map_or(0, NodeLease::generation).max(shown) + 1;
    let offered = Some(Lease { generation, nonce });
    let fresh = |retired: Vec<DatabaseId>| NodeLease { database: claim.database, held: None, offered, retired };
    let Some(record) = record else {
        return Ok((fresh(Vec::new()), Admission::TookOver { replaced: None }));
    };
    if claim.database != record.database {
        let mut retired = record.retired.clone();
        retired.push(record.database);
        let excess = retired.len().saturating_sub(RETIRED_MAX);
        retired.drain(..excess);
        return Ok((fresh(retired), Admission::TookOver { replaced: Some(record.database) }));
    }
    let held = if claim.lease.is_some() { claim.lease } else { record.held };
    let admission = if recovered { Admission::Recovered } else { Admission::Resumed };
    Ok((NodeLease { held, offered, ..record.clone() }, admission))
}

/// Refuses a retired database, and the node's database showing a lease it
/// no longer holds. `Ok(true)`: it shows a lease newer than the record
/// knows (the record was restored from a backup).
fn standing(record: &NodeLease, claim: Claim) -> Result<bool, Refused> {
    if record.retired.contains(&claim.database) {
        return Err(refused(
            RefusalReason::Superseded,
            format!(
                "database {} was replaced by another database of this node (a restore or a new install); \
                 it must not sync again",
                claim.database
            ),
        ));
    }
    if claim.database != record.database {
        return Ok(false);
    }
    let newer = claim.lease.is_some_and(|lease| lease.generation > record.generation());
    let holds = match claim.lease {
        Some(lease) => [record.held, record.offered].contains(&Some(lease)),
        // Never confirmed a lease: admitted only while none was confirmed.
        None => record.held.is_none(),
    };
    if !holds && !newer {
        return Err(refused(
            RefusalReason::Superseded,
            format!(
                "database {} holds an outdated lease: it is a copy, and the database it was copied from \
                 has synced since; this copy must not sync (restore a current backup with `edge-node restore` \
                 to take the node over)",
                claim.database
            ),
        ));
    }
    Ok(newer)
}

/// An open session of `database` takes a new lease (the next generation,
/// with `nonce`), as at a welcome: the one it held stops admitting anyone
/// once it confirms. `None` when another database speaks for the node now,
/// or while a lease offered is not confirmed: which one the edge holds is
/// not known then, and replacing the offer could void the one it stored
/// (its connection may have dropped before its `LeaseHeld` arrived).
pub fn offer(record: &NodeLease, database: DatabaseId, nonce: [u8; 16]) -> Option<NodeLease> {
    let offered = Lease { generation: record.generation() + 1, nonce };
    (record.database == database && record.offered.is_none())
        .then(|| NodeLease { offered: Some(offered), ..record.clone() })
}

/// The database says it holds `lease`, which a welcome (or [`offer`])
/// offered, durably: the lease it had before no longer admits anyone.
/// Returns the record to store, or `None` when there is nothing to change
/// (another database took over meanwhile, or it was confirmed already).
pub fn confirm(record: &NodeLease, database: DatabaseId, lease: Lease) -> Option<NodeLease> {
    (record.database == database && record.offered == Some(lease)).then(|| NodeLease {
        held: Some(lease),
        offered: None,
        ..record.clone()
    })
}

fn refused(reason: RefusalReason, detail: String) -> Refused {
    Refused { reason, detail }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: DatabaseId = DatabaseId([1; 16]);
    const RESTORED: DatabaseId = DatabaseId([2; 16]);

    fn claim(database: DatabaseId, lease: Option<Lease>) -> Claim {
        Claim { database, lease, connected_elsewhere: false }
    }

    /// Admits and confirms, as a welcome answered by `LeaseHeld` does;
    /// returns the record and the lease the database now holds.
    fn welcomed(
        record: Option<&NodeLease>,
        database: DatabaseId,
        lease: Option<Lease>,
        nonce: u8,
    ) -> (NodeLease, Lease) {
        let (record, _) = admit(record, claim(database, lease), [nonce; 16]).unwrap();
        let offered = record.offered.unwrap();
        (confirm(&record, database, offered).unwrap(), offered)
    }

    #[test]
    fn a_copy_is_refused_once_the_original_has_taken_a_new_lease() {
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        // The copy is made now: it holds the first lease, as the original does.
        let (record, second) = welcomed(Some(&record), ORIGINAL, Some(first), 11);
        assert!(second.generation > first.generation);
        let refusal = admit(Some(&record), claim(ORIGINAL, Some(first)), [12; 16]).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Superseded);
        assert!(refusal.detail.contains("outdated lease"), "{}", refusal.detail);
    }

    #[test]
    fn a_copy_refused_beside_its_original_stays_refused_once_the_original_takes_a_new_lease() {
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        let copy = claim(ORIGINAL, Some(first));
        // The original is connected: the copy is refused, and the original takes a new lease.
        let refusal = admit(Some(&record), Claim { connected_elsewhere: true, ..copy }, [11; 16]).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::AlreadyConnected);
        let record = offer(&record, ORIGINAL, [12; 16]).unwrap();
        let record = confirm(&record, ORIGINAL, record.offered.unwrap()).unwrap();
        // Offline or not, the original's old lease admits no one now.
        for connected_elsewhere in [true, false] {
            let refusal = admit(Some(&record), Claim { connected_elsewhere, ..copy }, [13; 16]).unwrap_err();
            assert_eq!(refusal.reason, RefusalReason::Superseded);
        }
        assert_eq!(offer(&record, RESTORED, [14; 16]), None, "only the node's database takes leases");
    }

    #[test]
    fn no_new_lease_is_offered_over_one_not_yet_confirmed() {
        // Welcomed with a lease the edge stored, but its confirmation was
        // lost with the connection; it reconnects while the old session is
        // still open here, which is asked to renew.
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        let (record, _) = admit(Some(&record), claim(ORIGINAL, Some(first)), [11; 16]).unwrap();
        let stored_by_the_edge = record.offered.unwrap();
        assert_eq!(offer(&record, ORIGINAL, [12; 16]), None);
        let (_, admission) = admit(Some(&record), claim(ORIGINAL, Some(stored_by_the_edge)), [13; 16]).unwrap();
        assert_eq!(admission, Admission::Resumed);
    }

    #[test]
    fn an_edge_that_did_not_store_or_confirm_its_new_lease_still_gets_in() {
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        // Offered a second lease, then crashed before storing it: shows the first.
        let (record, _) = admit(Some(&record), claim(ORIGINAL, Some(first)), [11; 16]).unwrap();
        let (record, admission) = admit(Some(&record), claim(ORIGINAL, Some(first)), [12; 16]).unwrap();
        assert_eq!(admission, Admission::Resumed);
        // Stored the third but crashed before confirming it: shows the third.
        let third = record.offered.unwrap();
        let (_, admission) = admit(Some(&record), claim(ORIGINAL, Some(third)), [13; 16]).unwrap();
        assert_eq!(admission, Admission::Resumed);
    }

    #[test]
    fn a_lease_newer_than_the_record_means_the_bridge_lost_it_and_is_admitted() {
        let (old_record, first) = welcomed(None, ORIGINAL, None, 10);
        let (record, second) = welcomed(Some(&old_record), ORIGINAL, Some(first), 11);
        // The bridge's store is restored to `old_record`; the node shows its newer lease.
        let (restored, admission) = admit(Some(&old_record), claim(ORIGINAL, Some(second)), [12; 16]).unwrap();
        assert_eq!(admission, Admission::Recovered);
        assert!(restored.offered.unwrap().generation > second.generation);
        // A copy still holding the first lease is refused by the current record.
        assert!(admit(Some(&record), claim(ORIGINAL, Some(first)), [13; 16]).is_err());
    }

    #[test]
    fn a_restore_takes_over_and_the_replaced_database_is_refused_by_name() {
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        let (record, admission) = admit(Some(&record), claim(RESTORED, None), [20; 16]).unwrap();
        assert_eq!(admission, Admission::TookOver { replaced: Some(ORIGINAL) });
        assert_eq!(record.retired, vec![ORIGINAL]);
        let refusal = admit(Some(&record), claim(ORIGINAL, Some(first)), [21; 16]).unwrap_err();
        assert_eq!(refusal.reason, RefusalReason::Superseded);
        assert!(refusal.detail.contains("was replaced"), "{}", refusal.detail);
    }

    #[test]
    fn a_database_that_never_confirmed_a_lease_is_refused_once_one_was_confirmed() {
        let (record, first) = welcomed(None, ORIGINAL, None, 10);
        assert!(admit(Some(&record), claim(ORIGINAL, None), [11; 16]).is_err());
        assert_eq!(confirm(&record, ORIGINAL, first), None, "confirmed already");
    }

    #[test]
    fn retired_databases_are_bounded() {
        let (mut record, _) = welcomed(None, DatabaseId([0; 16]), None, 0);
        for n in 1..=(RETIRED_MAX as u8 + 4) {
            record = welcomed(Some(&record), DatabaseId([n; 16]), None, n).0;
        }
        assert_eq!(record.retired.len(), RETIRED_MAX);
        assert_eq!(record.retired.last(), Some(&DatabaseId([RETIRED_MAX as u8 + 3; 16])));
    }
}
