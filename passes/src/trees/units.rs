//! Leaf lookups: which internal nodes each one reads, and its table.
//!
//! A unit is a node `u` at depth `d` and, when the lookup stays within its bit budget,
//! those of its children that are parents of leaves. It reads `S + (d + 1)·Σ_i 2^i·test_i`: `S` sums the edge
//! conditions from the root to `u` (each `b` or `1 − b`, so `S = d` iff `u` is
//! reached) and `test_i` is the i-th node's test (`b` or `1 − b`). Its table walks the
//! unit with those tests and returns the leaf it ends at, or 0 when `u` is not reached
//! or the walk leaves the unit (another unit answers then). Each parent of a leaf is in
//! exactly one unit, so exactly one unit of a tree returns a leaf.

use std::collections::HashMap;
use veil_ir::op::TreeNode;

/// What an internal node tests: its comparison bit, and whether its test is that bit
/// (true) or its negation.
#[derive(Clone, Copy, Debug)]
pub struct Test {
    pub bit: usize,
    pub positive: bool,
}

pub struct Unit {
    pub tree: usize,
    /// Depth of the unit's root.
    pub depth: i64,
    /// The internal nodes whose tests the unit reads; test i is `nodes[i]`'s.
    pub nodes: Vec<usize>,
    /// What the lookup reads: coefficient per comparison bit, and a constant.
    pub weights: HashMap<usize, i64>,
    pub constant: i64,
}

fn children(tree: &[TreeNode], k: usize) -> [usize; 2] {
    match tree[k] {
        TreeNode::Branch { if_true, if_false, .. } => [if_true, if_false],
        TreeNode::Leaf { .. } => [k, k],
    }
}

fn is_leaf(tree: &[TreeNode], k: usize) -> bool {
    matches!(tree[k], TreeNode::Leaf { .. })
}

/// The units of tree `t` (whose root is internal), given each internal node's test.
/// Every parent of a leaf is in exactly one unit; a unit rooted at `u` (depth `d`) holds
/// `u` and those of its children that are parents of leaves, when `(d + 1)·2^(nodes)`
/// values fit `budget` bits.
pub fn partition(t: usize, tree: &[TreeNode], test: &dyn Fn(usize) -> Test, budget: u32) -> Vec<Unit> {
    // edge conditions from the root to each internal node: (bit, taken when b == holds)
    let mut path: HashMap<usize, Vec<(usize, bool)>> = HashMap::from([(0, Vec::new())]);
    let mut order = vec![0usize];
    let mut i = 0;
    while i < order.len() {
        let k = order[i];
        i += 1;
        let Test { bit, positive } = test(k);
        let [yes, no] = children(tree, k);
        for (child, holds) in [(yes, positive), (no, !positive)] {
            if !is_leaf(tree, child) {
                let mut p = path[&k].clone();
                p.push((bit, holds));
                path.insert(child, p);
                order.push(child);
            }
        }
    }
    // Leaf parents, deepest first, each joins one unit: with its parent and siblings when
    // the read fits the budget (so sibling leaf parents share a lookup), else alone.
    let parent: HashMap<usize, usize> =
        order.iter().flat_map(|&k| children(tree, k).into_iter().map(move |c| (c, k))).collect();
    let leaf_parent = |k: usize| children(tree, k).iter().any(|&c| is_leaf(tree, c));
    let mut todo: Vec<usize> = order.iter().copied().filter(|&k| leaf_parent(k)).collect();
    todo.sort_by_key(|k| std::cmp::Reverse(path[k].len()));
    let mut covered = std::collections::HashSet::new();
    let mut units = Vec::new();
    for p in todo {
        if covered.contains(&p) {
            continue;
        }
        let mut nodes = vec![p];
        if let Some(&a) = parent.get(&p).filter(|a| !(leaf_parent(**a) && covered.contains(*a))) {
            let kids: Vec<usize> = children(tree, a)
                .into_iter()
                .filter(|&c| !is_leaf(tree, c) && leaf_parent(c) && !covered.contains(&c))
                .collect();
            let joined: Vec<usize> = std::iter::once(a).chain(kids).collect();
            let depth = path[&a].len() as i64;
            if (depth + 1) << joined.len() <= 1i64 << budget {
                nodes = joined;
            }
        }
        covered.extend(nodes.iter().copied().filter(|&n| leaf_parent(n)));
        let depth = path[&nodes[0]].len() as i64;
        let mut unit = Unit { tree: t, depth, nodes, weights: HashMap::new(), constant: 0 };
        for &(bit, holds) in &path[&unit.nodes[0]] {
            unit.add(bit, if holds { 1 } else { -1 }, i64::from(!holds));
        }
        for i in 0..unit.nodes.len() {
            let Test { bit, positive } = test(unit.nodes[i]);
            let k = (depth + 1) << i;
            unit.add(bit, if positive { k } else { -k }, if positive { 0 } else { k });
        }
        units.push(unit);
    }
    units
}

impl Unit {
    fn add(&mut self, bit: usize, w: i64, c: i64) {
        *self.weights.entry(bit).or_default() += w;
        self.constant += c;
    }

    /// The leaf the lookup returns when it reads `v`, if any.
    pub fn leaf_at(&self, tree: &[TreeNode], v: i64) -> Option<usize> {
        let (s, code) = (v % (self.depth + 1), v / (self.depth + 1));
        if s != self.depth {
            return None;
        }
        let mut at = self.nodes[0];
        loop {
            let i = self.nodes.iter().position(|&n| n == at)?;
            let [yes, no] = children(tree, at);
            let next = if (code >> i) & 1 == 1 { yes } else { no };
            if is_leaf(tree, next) {
                return Some(next);
            }
            at = next;
        }
    }

    /// Leaves the unit can return.
    pub fn leaves(&self, tree: &[TreeNode]) -> Vec<usize> {
        self.nodes.iter().flat_map(|&n| children(tree, n)).filter(|&c| is_leaf(tree, c)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use veil_ir::op::BranchMode;

    fn branch(if_true: usize, if_false: usize) -> TreeNode {
        TreeNode::Branch { feature: 0, threshold: 0.0, mode: BranchMode::Leq, if_true, if_false, nan_true: false }
    }

    #[test]
    fn every_path_ends_in_exactly_one_unit() {
        // depth-3 tree: 0 → (1, 2); 1 → (3, 4); 2 → (leaf 5, 6); 3, 4, 6 → leaf pairs
        let leaf = || TreeNode::Leaf { weights: vec![] };
        let tree = vec![
            branch(1, 2),
            branch(3, 4),
            branch(5, 6),
            branch(7, 8),
            branch(9, 10),
            leaf(),
            branch(11, 12),
            leaf(),
            leaf(),
            leaf(),
            leaf(),
            leaf(),
            leaf(),
        ];
        let test = |k: usize| Test { bit: k, positive: k.is_multiple_of(2) };
        for budget in [3, 4, 5] {
            let units = partition(0, &tree, &test, budget);
            // every assignment of the node bits reaches one leaf, which one unit returns
            for bits in 0u32..1 << 7 {
                let b = |k: usize| i64::from((bits >> k) & 1 == 1);
                let tested = |k: usize| if test(k).positive { b(k) } else { 1 - b(k) };
                let mut at = 0;
                while let TreeNode::Branch { if_true, if_false, .. } = tree[at] {
                    at = if tested(at) == 1 { if_true } else { if_false };
                }
                let found: Vec<usize> = units
                    .iter()
                    .filter_map(|u| {
                        let v = u.constant + u.weights.iter().map(|(&k, &w)| w * b(k)).sum::<i64>();
                        u.leaf_at(&tree, v)
                    })
                    .collect();
                assert_eq!(found, vec![at], "budget {budget}, bits {bits:07b}");
            }
            eprintln!("budget {budget}: {} units", units.len());
        }
    }
}
