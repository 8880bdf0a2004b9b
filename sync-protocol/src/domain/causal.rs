//! Canonical ordering of a causal graph: every node after the nodes it
//! depends on, ties broken by a key. A pure function of the set of nodes, so
//! every replica holding the same nodes derives the same order.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hash;

/// Orders `nodes` so that each comes after its dependencies (`deps`), with
/// ready nodes taken smallest `tie_key` first. Dependencies not in the set are
/// ignored. Nodes caught in a cycle (only forged input can make one) are
/// appended in `tie_key` order, never dropped.
pub fn order<'a, T, Id, Key>(
    nodes: &'a [T],
    id: impl Fn(&'a T) -> Id,
    deps: impl Fn(&'a T) -> Vec<Id>,
    tie_key: impl Fn(&'a T) -> Key,
) -> Vec<&'a T>
where
    Id: Eq + Hash,
    Key: Ord,
{
    let index: HashMap<Id, usize> = nodes.iter().enumerate().map(|(i, node)| (id(node), i)).collect();
    let mut waiting_on = vec![0usize; nodes.len()];
    let mut unblocks: Vec<Vec<usize>> = vec![Vec::new(); nodes.len()];
    for (i, node) in nodes.iter().enumerate() {
        for dep in deps(node) {
            if let Some(&j) = index.get(&dep).filter(|&&j| j != i) {
                waiting_on[i] += 1;
                unblocks[j].push(i);
            }
        }
    }
    let key = |i: usize| Reverse((tie_key(&nodes[i]), i));
    let mut ready: BinaryHeap<_> = (0..nodes.len()).filter(|&i| waiting_on[i] == 0).map(key).collect();
    let mut placed = vec![false; nodes.len()];
    let mut ordered = Vec::with_capacity(nodes.len());
    while let Some(Reverse((_, i))) = ready.pop() {
        ordered.push(i);
        placed[i] = true;
        for &next in &unblocks[i] {
            waiting_on[next] -= 1;
            if waiting_on[next] == 0 {
                ready.push(key(next));
            }
        }
    }
    let mut stranded: Vec<usize> = (0..nodes.len()).filter(|&i| !placed[i]).collect();
    stranded.sort_by_key(|&i| key(i).0);
    ordered.extend(stranded);
    ordered.into_iter().map(|i| &nodes[i]).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dependencies_come_first_whatever_the_keys() {
        // (id, deps, key): "b" has the smallest key but depends on "a".
        let nodes = [("b", vec!["a"], 0), ("a", vec![], 9), ("c", vec![], 5)];
        let ordered: Vec<_> = order(&nodes, |n| n.0, |n| n.1.clone(), |n| n.2).into_iter().map(|n| n.0).collect();
        assert_eq!(ordered, ["c", "a", "b"]);
    }

    #[test]
    fn cycles_keep_every_node() {
        let nodes = [("a", vec!["b"], 1), ("b", vec!["a"], 0), ("c", vec![], 2)];
        let ordered: Vec<_> = order(&nodes, |n| n.0, |n| n.1.clone(), |n| n.2).into_iter().map(|n| n.0).collect();
        assert_eq!(ordered, ["c", "b", "a"]);
    }
}
