//! Who may move a ticket where, and how the current status follows from the
//! recorded transitions when replicas made some of them concurrently.
//!
//! Status is not a last-writer-wins register. Every transition is kept as an
//! entry naming the transitions its author had seen (`seen`), which makes the
//! transitions a causal graph. [`resolve`] folds that graph in one canonical
//! order (causal, ties broken by time and id), so every replica that holds the
//! same transitions computes the same status, whatever order they arrived in.
//!
//! The fold never moves a ticket backwards along requested -> acknowledged ->
//! picking -> dispatched -> delivered, and never drops a transition: one that
//! cannot hold beside another becomes a [`Conflict`] naming both, until a
//! person records a resolving transition.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::ids::{NodeId, Role, UserId};
use crate::ticket::{Conflict, OrderConflict, Status, TicketError, TransitionRef, UnixMillis};

/// Whether `role` may move a ticket from `from` to `to`. The single place
/// where the lifecycle's permissions live.
pub fn check_transition(from: Status, to: Status, role: Role) -> Result<(), TicketError> {
    use Status::*;
    let pharmacy = role.works_at_pharmacy();
    let ward = role.works_at_ward();
    let allowed = match to {
        // The pharmacy may skip steps it did not record (pick straight from
        // the queue), but never goes back.
        Acknowledged => pharmacy && from == Requested,
        Picking => pharmacy && matches!(from, Requested | Acknowledged),
        Dispatched => pharmacy && matches!(from, Acknowledged | Picking),
        // Only the ward can say the medication arrived.
        Delivered => ward && from == Dispatched,
        // Once dispatched the goods are moving: a cancel then needs a person.
        Cancelled => ward && matches!(from, Requested | Acknowledged | Picking),
        Rejected => pharmacy && matches!(from, Requested | Acknowledged | Picking),
        // A nurse may withdraw her own mistake before anyone acted on it;
        // an admin may mark any record as entered in error.
        EnteredInError => match role {
            Role::Admin => from != EnteredInError,
            Role::Nurse => from == Requested,
            Role::Pharmacist | Role::EdgeNode => false,
        },
        Requested => false,
    };
    if allowed { Ok(()) } else { Err(TicketError::IllegalTransition { from, to, role }) }
}

/// What a role may change besides the status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditKind {
    /// Line items and priority: the ward's order itself.
    Order,
    Notes,
    Assignee,
    /// What the pharmacy supplies per line.
    Supply,
    /// What the ward received per line.
    Receipt,
}

impl EditKind {
    fn verb(self) -> &'static str {
        match self {
            EditKind::Order => "change the items or priority of",
            EditKind::Notes => "change the notes of",
            EditKind::Assignee => "assign",
            EditKind::Supply => "record the supply of",
            EditKind::Receipt => "record the receipt of",
        }
    }

    /// The status in which the most roles may make the edit: what a peer's
    /// edit is checked against, since the status its author saw is not
    /// recorded for edits.
    pub fn most_permissive_status(self) -> Status {
        match self {
            EditKind::Notes | EditKind::Order => Status::Requested,
            EditKind::Assignee | EditKind::Supply => Status::Acknowledged,
            EditKind::Receipt => Status::Dispatched,
        }
    }

    fn action(self) -> &'static str {
        match self {
            EditKind::Order => "change a ticket's items or priority",
            EditKind::Notes => "change a ticket's notes",
            EditKind::Assignee => "assign tickets",
            EditKind::Supply => "record what the pharmacy supplies",
            EditKind::Receipt => "record what a ward received",
        }
    }
}

/// Whether `role` may make an edit of `kind` to a ticket in `status`: a
/// role that may never make it is `Forbidden`; a status that does not
/// allow it now is an `IllegalEdit`.
pub fn check_edit(kind: EditKind, status: Status, role: Role) -> Result<(), TicketError> {
    let role_may = match kind {
        // The order is the ward's; who fills it is the pharmacy's to decide.
        EditKind::Order => role.works_at_ward(),
        EditKind::Notes => role != Role::EdgeNode,
        EditKind::Assignee | EditKind::Supply => role.works_at_pharmacy(),
        EditKind::Receipt => role.works_at_ward(),
    };
    if !role_may {
        return Err(TicketError::Forbidden { role, action: kind.action() });
    }
    let status_allows = match kind {
        // Once picking has started the order is being filled; changing it
        // then would silently invalidate what is on the pharmacist's bench.
        EditKind::Order => matches!(status, Status::Requested | Status::Acknowledged),
        EditKind::Notes => status != Status::EnteredInError,
        EditKind::Assignee => !status.is_final(),
        // While picking and dispatching; once delivered, only to fill or
        // close a backordered line (checked by the caller, who knows the lines).
        EditKind::Supply => {
            matches!(status, Status::Acknowledged | Status::Picking | Status::Dispatched | Status::Delivered)
        }
        EditKind::Receipt => matches!(status, Status::Dispatched | Status::Delivered),
    };
    if status_allows { Ok(()) } else { Err(TicketError::IllegalEdit { what: kind.verb(), status, role }) }
}

/// One recorded status transition, as stored in the ticket document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Unique per transition (a UUID); conflicts and resolutions refer to it.
    pub id: String,
    pub to: Status,
    /// The transitions that were the latest ones the author had seen.
    pub seen: Vec<String>,
    /// Transitions whose conflicts this one resolves; empty for a plain transition.
    pub resolves: Vec<String>,
    pub reason: Option<String>,
    pub user: UserId,
    pub role: Role,
    pub device: NodeId,
    pub at: UnixMillis,
}

impl Transition {
    pub fn to_ref(&self) -> TransitionRef {
        TransitionRef {
            id: self.id.clone(),
            to: self.to,
            reason: self.reason.clone(),
            user: self.user.clone(),
            role: self.role,
            device: self.device.clone(),
            at: self.at,
            at_utc: crate::ticket::utc_iso8601(self.at),
        }
    }
}

/// The status that follows from a ticket's transitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolution {
    pub status: Status,
    pub status_reason: Option<String>,
    pub conflicts: Vec<Conflict>,
    /// The transitions no other transition has seen: what a new transition's `seen` must name.
    pub heads: Vec<String>,
}

/// Terminal statuses off the main path, when two of them meet: the one that
/// says more about the record wins. Both already close the ticket, so this is
/// not a conflict a person must resolve, and both stay in the history.
fn closing_precedence(status: Status) -> u8 {
    match status {
        Status::EnteredInError => 3,
        Status::Rejected => 2,
        Status::Cancelled => 1,
        _ => 0,
    }
}

/// The transitions in canonical order: every transition after those it has
/// seen, ties broken by (time, id). See [`crate::causal::order`].
pub fn canonical_order(transitions: &[Transition]) -> Vec<&Transition> {
    crate::causal::order(
        transitions,
        |t| t.id.as_str(),
        |t| t.seen.iter().map(String::as_str).collect(),
        |t| (t.at, t.id.as_str()),
    )
}

/// Folds transitions into the current status. See the module docs.
pub fn resolve(transitions: &[Transition]) -> Resolution {
    let mut fold = Fold::default();
    for t in canonical_order(transitions) {
        fold.apply(t);
    }
    let mut seen_by_someone = HashSet::new();
    for t in transitions {
        seen_by_someone.extend(t.seen.iter().map(String::as_str));
    }
    let mut heads: Vec<String> =
        transitions.iter().filter(|t| !seen_by_someone.contains(t.id.as_str())).map(|t| t.id.clone()).collect();
    heads.sort();
    let shown = fold.shown();
    Resolution {
        status: shown.map_or(Status::Requested, |t| t.to),
        status_reason: shown.and_then(|t| t.reason.clone()),
        conflicts: fold.conflicts,
        heads,
    }
}

/// The state of the fold: how far the ticket got along the main path, and
/// every closing transition (cancel, reject, entered-in-error) that still
/// holds beside that progress. Keeping all of them, not just the one shown,
/// is what lets a closing transition survive when a concurrent one with
/// higher precedence is later overridden.
#[derive(Default)]
struct Fold<'a> {
    /// The transition that set the main-path status; `None` while requested.
    progress: Option<&'a Transition>,
    /// The first transition (in canonical order) to reach each main-path rank.
    reached: BTreeMap<u8, &'a Transition>,
    /// Closing transitions that hold, in the order they were applied.
    closing: Vec<&'a Transition>,
    conflicts: Vec<Conflict>,
}

impl<'a> Fold<'a> {
    fn progress_status(&self) -> Status {
        self.progress.map_or(Status::Requested, |t| t.to)
    }

    /// The transition whose status the ticket shows: the closing one with the
    /// highest precedence if any holds, else the main-path progress.
    fn shown(&self) -> Option<&'a Transition> {
        // `max_by_key` keeps the last of equals: the latest in canonical order.
        self.closing.iter().copied().max_by_key(|t| closing_precedence(t.to)).or(self.progress)
    }

    fn status(&self) -> Status {
        self.shown().map_or(Status::Requested, |t| t.to)
    }

    fn set_progress(&mut self, t: &'a Transition) {
        self.progress = Some(t);
        self.note_progress(t);
    }

    fn note_progress(&mut self, t: &'a Transition) {
        if let Some(rank) = t.to.progress_rank() {
            self.reached.entry(rank).or_insert(t);
        }
    }

    fn conflict(&mut self, held: Option<&'a Transition>, overridden: &'a Transition) {
        // With no holder, the overridden transition conflicts with the
        // ticket's creation; it names itself on both sides.
        let held = held.unwrap_or(overridden);
        self.conflicts.push(Conflict { held: held.to_ref(), overridden: overridden.to_ref() });
    }

    fn apply(&mut self, t: &'a Transition) {
        if !t.resolves.is_empty() {
            // A person saw the conflict and chose the outcome; it was checked
            // against the conflict when it was authored (`check_resolution`).
            self.conflicts.retain(|c| !t.resolves.contains(&c.held.id) && !t.resolves.contains(&c.overridden.id));
            if t.to.progress_rank().is_some() {
                self.closing.clear();
                self.set_progress(t);
            } else {
                self.closing = vec![t];
            }
            return;
        }
        match t.to.progress_rank() {
            Some(target) => self.apply_progress(t, target),
            None => self.apply_closing(t),
        }
    }

    fn apply_progress(&mut self, t: &'a Transition, target: u8) {
        let current = self.progress_status();
        if check_transition(current, t.to, t.role).is_ok() {
            self.set_progress(t);
        } else if current.progress_rank().is_some_and(|rank| target <= rank) {
            // Someone else already moved the ticket at least as far.
            self.note_progress(t);
            return;
        } else {
            // A jump forward no role may make from here (only a forged or
            // corrupted change can carry one): kept visible, not applied.
            self.conflict(self.progress, t);
            return;
        }
        // Closing transitions made concurrently with this progress still
        // hold if the rules allow them after it (a cancel beside an
        // acknowledge); otherwise the goods are moving and a person decides.
        let progress = t.to;
        let (holding, overridden): (Vec<_>, Vec<_>) =
            self.closing.drain(..).partition(|c| check_transition(progress, c.to, c.role).is_ok());
        self.closing = holding;
        for closing in overridden {
            self.conflict(Some(t), closing);
        }
    }

    fn apply_closing(&mut self, t: &'a Transition) {
        // Allowed after the main-path progress, or after what is shown (an
        // admin marking a cancelled ticket as entered in error).
        if check_transition(self.progress_status(), t.to, t.role).is_ok()
            || check_transition(self.status(), t.to, t.role).is_ok()
        {
            self.closing.push(t);
            return;
        }
        // Too late for the progress made concurrently: name the transition
        // that first made it impossible.
        let blocker = self
            .reached
            .iter()
            .find(|(rank, _)| check_transition(status_at_rank(**rank), t.to, t.role).is_err())
            .map(|(_, blocker)| *blocker)
            .or(self.progress);
        self.conflict(blocker, t);
    }
}

fn status_at_rank(rank: u8) -> Status {
    Status::ALL.into_iter().find(|s| s.progress_rank() == Some(rank)).unwrap_or(Status::Requested)
}

/// Checks a resolving transition: it must name open conflicts and choose an
/// outcome that one side of each of them asked for. An order conflict (named
/// by its edit's change) is settled by accepting the order as it now stands:
/// the outcome is the ticket's `status` as it is.
pub fn check_resolution(
    conflicts: &[Conflict],
    order_conflicts: &[OrderConflict],
    resolves: &[String],
    to: Status,
    status: Status,
    role: Role,
) -> Result<(), TicketError> {
    if role == Role::EdgeNode {
        return Err(TicketError::Forbidden { role, action: "resolve conflicts" });
    }
    for id in resolves {
        if let Some(conflict) = conflicts.iter().find(|c| &c.held.id == id || &c.overridden.id == id) {
            if to != conflict.held.to && to != conflict.overridden.to {
                return Err(TicketError::ResolutionOutcome {
                    allowed: format!("{} or {}", conflict.held.to, conflict.overridden.to),
                    got: to,
                });
            }
        } else if order_conflicts.iter().any(|c| &c.edit.change == id) {
            if to != status {
                return Err(TicketError::ResolutionOutcome {
                    allowed: format!("{status} (the status as it is)"),
                    got: to,
                });
            }
        } else {
            return Err(TicketError::UnknownConflict(id.clone()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(id: &str, to: Status, role: Role, seen: &[&str], at: UnixMillis) -> Transition {
        Transition {
            id: id.into(),
            to,
            seen: seen.iter().map(|s| s.to_string()).collect(),
            resolves: vec![],
            reason: None,
            user: "u".parse().unwrap(),
            role,
            device: "d".parse().unwrap(),
            at,
        }
    }

    #[test]
    fn permissions_follow_the_lifecycle() {
        use Status::*;
        assert!(check_transition(Requested, Acknowledged, Role::Pharmacist).is_ok());
        assert!(check_transition(Requested, Acknowledged, Role::Nurse).is_err());
        assert!(check_transition(Dispatched, Delivered, Role::Nurse).is_ok());
        assert!(check_transition(Dispatched, Delivered, Role::Pharmacist).is_err());
        assert!(check_transition(Picking, Cancelled, Role::Nurse).is_ok());
        assert!(check_transition(Dispatched, Cancelled, Role::Nurse).is_err());
        assert!(check_transition(Picking, Acknowledged, Role::Pharmacist).is_err());
        assert!(check_transition(Delivered, EnteredInError, Role::Admin).is_ok());
        assert!(check_transition(Acknowledged, EnteredInError, Role::Nurse).is_err());
        for to in Status::ALL {
            assert!(check_transition(Requested, to, Role::EdgeNode).is_err());
        }
    }

    #[test]
    fn concurrent_progress_takes_the_furthest() {
        use Status::*;
        let ts = [
            t("a", Acknowledged, Role::Pharmacist, &[], 1),
            t("b", Picking, Role::Pharmacist, &[], 2),
            t("c", Acknowledged, Role::Admin, &[], 3),
        ];
        let r = resolve(&ts);
        assert_eq!((r.status, r.conflicts.len()), (Picking, 0));
    }

    #[test]
    fn a_cancel_beside_an_acknowledge_holds() {
        use Status::*;
        let ts = [t("ack", Acknowledged, Role::Pharmacist, &[], 2), t("cancel", Cancelled, Role::Nurse, &[], 1)];
        let r = resolve(&ts);
        assert_eq!((r.status, r.conflicts.len()), (Cancelled, 0));
        let mut reversed = ts.clone();
        reversed[0].at = 0;
        assert_eq!(resolve(&reversed).status, Cancelled);
    }

    #[test]
    fn a_cancel_beside_a_dispatch_is_a_conflict_whatever_the_clocks_say() {
        use Status::*;
        for cancel_at in [0, 15, 100] {
            let ts = [
                t("ack", Acknowledged, Role::Pharmacist, &[], 10),
                t("pick", Picking, Role::Pharmacist, &["ack"], 20),
                t("dispatch", Dispatched, Role::Pharmacist, &["pick"], 30),
                t("cancel", Cancelled, Role::Nurse, &[], cancel_at),
            ];
            let r = resolve(&ts);
            assert_eq!(r.status, Dispatched, "cancel at {cancel_at}");
            assert_eq!(r.conflicts.len(), 1);
            assert_eq!(
                (r.conflicts[0].held.id.as_str(), r.conflicts[0].overridden.id.as_str()),
                ("dispatch", "cancel")
            );
            assert_eq!(r.heads, vec!["cancel".to_string(), "dispatch".to_string()]);
        }
    }

    /// Found by `status_never_silently_regresses`: a rejection must survive
    /// when a concurrent, higher-precedence closing transition is overridden.
    #[test]
    fn a_closing_transition_survives_when_a_stronger_one_is_overridden() {
        use Status::*;
        let ts = [
            t("eie", EnteredInError, Role::Nurse, &[], 1_000),
            t("reject", Rejected, Role::Pharmacist, &[], 1_001),
            t("ack", Acknowledged, Role::Pharmacist, &[], 1_002),
        ];
        let r = resolve(&ts);
        assert_eq!(r.status, Rejected);
        assert_eq!(r.conflicts.len(), 1);
        assert_eq!((r.conflicts[0].held.id.as_str(), r.conflicts[0].overridden.id.as_str()), ("ack", "eie"));
        assert_eq!(resolve(&ts[1..]).status, Rejected, "the replica that never saw the nurse's change agrees");
    }

    #[test]
    fn a_resolution_clears_the_conflict() {
        use Status::*;
        let mut resolution = t("res", Cancelled, Role::Pharmacist, &["cancel", "dispatch"], 50);
        resolution.resolves = vec!["cancel".into()];
        let ts = [
            t("ack", Acknowledged, Role::Pharmacist, &[], 10),
            t("dispatch", Dispatched, Role::Pharmacist, &["ack"], 30),
            t("cancel", Cancelled, Role::Nurse, &[], 20),
            resolution,
        ];
        let r = resolve(&ts);
        assert_eq!((r.status, r.conflicts.len()), (Cancelled, 0));
        assert_eq!(r.heads, vec!["res".to_string()]);
    }

    #[test]
    fn resolutions_must_pick_a_side_of_an_open_conflict() {
        let ts = [
            t("dispatch", Status::Dispatched, Role::Pharmacist, &[], 30),
            t("cancel", Status::Cancelled, Role::Nurse, &[], 20),
        ];
        let conflicts = vec![Conflict { held: ts[0].to_ref(), overridden: ts[1].to_ref() }];
        let check = |resolves: &str, to| {
            check_resolution(&conflicts, &[], &[resolves.into()], to, Status::Dispatched, Role::Pharmacist)
        };
        assert!(check("cancel", Status::Cancelled).is_ok());
        assert!(check("cancel", Status::Rejected).is_err());
        assert!(check("nope", Status::Cancelled).is_err());
    }

    #[test]
    fn cycles_from_forged_documents_do_not_drop_transitions() {
        let ts = [
            t("a", Status::Acknowledged, Role::Pharmacist, &["b"], 1),
            t("b", Status::Picking, Role::Pharmacist, &["a"], 2),
        ];
        assert_eq!(canonical_order(&ts).len(), 2);
    }
}
