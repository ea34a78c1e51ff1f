//! Which large key each value is under, when the circuit runs with several parameter
//! sets (partitions): a lookup's outputs are under its partition's key, a linear map's
//! output under its inputs' key, and every input of a linear map must share one. Inputs
//! take the key of the partition whose lookups read them (partition 0 when several do).

use crate::circuit::{Circuit, Instruction};
use petgraph::unionfind::UnionFind;

/// The partition of every value's large key, or why the circuit cannot be split so (a
/// linear map mixing values of two partitions).
pub(super) fn assign(c: &Circuit) -> Result<Vec<u8>, String> {
    let n = c.value_len.len();
    let mut classes = UnionFind::<usize>::new(n);
    for ins in &c.instructions {
        if let Instruction::Linear(l) = ins {
            for &i in &l.inputs {
                classes.union(i, l.output);
            }
        }
    }
    // what fixes each class's key: the lookups writing into it
    let mut fixed: Vec<Option<u8>> = vec![None; n];
    for ins in &c.instructions {
        if let Instruction::Lookup(l) = ins {
            for out in std::iter::once(l.output).chain(l.second) {
                let r = classes.find(out);
                match fixed[r] {
                    Some(q) if q != l.partition => {
                        return Err(format!(
                            "a linear map combines outputs of lookups in parameter sets {q} and {}",
                            l.partition
                        ))
                    }
                    _ => fixed[r] = Some(l.partition),
                }
            }
        }
    }
    // classes no lookup writes (inputs and what is computed from them alone): the key of
    // the partition reading them, if only one does
    let mut readers: Vec<Option<Option<u8>>> = vec![None; n];
    for ins in &c.instructions {
        if let Instruction::Lookup(l) = ins {
            let r = classes.find(l.input);
            readers[r] = match readers[r] {
                None => Some(Some(l.partition)),
                Some(Some(q)) if q == l.partition => Some(Some(q)),
                _ => Some(None),
            };
        }
    }
    Ok((0..n)
        .map(|v| {
            let r = classes.find(v);
            fixed[r].or(readers[r].flatten()).unwrap_or(0)
        })
        .collect())
}
