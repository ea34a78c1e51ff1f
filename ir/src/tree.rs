//! Structural checks of a [`TreeEnsemble`]: every tree is a tree.

use crate::op::{TreeEnsemble, TreeNode};
use std::fmt;

/// A malformed tree: which tree, which node (position in the tree's node list), what.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeFault {
    pub tree: usize,
    pub node: usize,
    pub msg: String,
}

impl fmt::Display for TreeFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "tree {} node {}: {}", self.tree, self.node, self.msg)
    }
}

impl TreeEnsemble {
    /// Every tree is non-empty, each node is reached from the root (node 0) exactly once
    /// (no cycle, no shared child, no orphan), children and features exist, thresholds
    /// are numbers and leaf targets exist.
    pub fn check(&self) -> Result<(), TreeFault> {
        if !(self.base_values.is_empty() || self.base_values.len() == 1 || self.base_values.len() == self.n_targets) {
            let msg = format!("{} base values for {} targets", self.base_values.len(), self.n_targets);
            return Err(TreeFault { tree: 0, node: 0, msg });
        }
        for (t, tree) in self.trees.iter().enumerate() {
            let fault = |node: usize, msg: String| TreeFault { tree: t, node, msg };
            if tree.is_empty() {
                return Err(fault(0, "the tree has no nodes".into()));
            }
            let mut seen = vec![false; tree.len()];
            let mut stack = vec![0usize];
            while let Some(k) = stack.pop() {
                if std::mem::replace(&mut seen[k], true) {
                    return Err(fault(k, "reached twice from the root (a cycle or a shared child)".into()));
                }
                match &tree[k] {
                    TreeNode::Branch { feature, threshold, if_true, if_false, .. } => {
                        if *feature >= self.n_features {
                            return Err(fault(k, format!("reads feature {feature}; there are {}", self.n_features)));
                        }
                        if threshold.is_nan() {
                            return Err(fault(k, "its threshold is NaN".into()));
                        }
                        for &c in [if_true, if_false] {
                            if c >= tree.len() {
                                return Err(fault(k, format!("child {c} does not exist ({} nodes)", tree.len())));
                            }
                            stack.push(c);
                        }
                    }
                    TreeNode::Leaf { weights } => {
                        if let Some(&(target, _)) = weights.iter().find(|(target, _)| *target >= self.n_targets) {
                            return Err(fault(k, format!("writes target {target}; there are {}", self.n_targets)));
                        }
                    }
                }
            }
            if let Some(orphan) = seen.iter().position(|s| !s) {
                return Err(fault(orphan, "not reachable from the root".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::op::{Aggregate, BranchMode};

    fn branch(if_true: usize, if_false: usize) -> TreeNode {
        TreeNode::Branch { feature: 0, threshold: 0.5, mode: BranchMode::Leq, if_true, if_false, nan_true: false }
    }

    fn leaf() -> TreeNode {
        TreeNode::Leaf { weights: vec![(0, 1.0)] }
    }

    fn ensemble(tree: Vec<TreeNode>) -> TreeEnsemble {
        TreeEnsemble { n_features: 1, n_targets: 1, trees: vec![tree], aggregate: Aggregate::Sum, base_values: vec![] }
    }

    #[test]
    fn malformed_trees_name_the_node() {
        assert!(ensemble(vec![branch(1, 2), leaf(), leaf()]).check().is_ok());
        let cycle = ensemble(vec![branch(1, 2), branch(0, 2), leaf()]).check().unwrap_err();
        assert!(cycle.msg.contains("reached twice"), "{cycle}");
        let missing = ensemble(vec![branch(1, 5), leaf()]).check().unwrap_err();
        assert_eq!((missing.node, missing.msg.contains("child 5")), (0, true), "{missing}");
        let orphan = ensemble(vec![branch(1, 1), leaf(), leaf()]).check().unwrap_err();
        assert!(orphan.msg.contains("twice"), "{orphan}");
        let unreached = ensemble(vec![leaf(), leaf()]).check().unwrap_err();
        assert_eq!(unreached.node, 1, "{unreached}");
    }
}
