//! Which large key each value is under, when the circuit runs with several parameter
//! sets (partitions): a lookup's outputs are under its partition's key, a linear map's
//! output under its inputs' key, and every input of a linear map must share one. Inputs
//! take the key of the partition whose lookups read them (partition 0 when several do).

use crate::circuit::{Circuit, Instruction};

/// Union-find root of `v`.
fn root(parent: &mut [usize], mut v: usize) -> usize {
    while parent[v] != v {
        parent[v] = parent[parent[v]];
        v = parent[v];
    }
    v
}

/// The partition of every value's large key, or why the circuit cannot be split so (a
/// linear map mixing values of two partitions).
pub(super) fn assign(c: &Circuit) -> Result<Vec<u8>, String> {
    let n = c.value_len.len();
    let mut parent: Vec<usize> = (0..n).collect();
    for ins in &c.instructions {
        if let Instruction::Linear(l) = ins {
            for &i in &l.inputs {
                let (a, b) = (root(&mut parent, i), root(&mut parent, l.output));
                parent[a] = b;
            }
        }
    }
    // what fixes each class's key: the lookups writing into it
    let mut fixed: Vec<Option<u8>> = vec![None; n];
    for ins in &c.instructions {
        if let Instruction::Lookup(l) = ins {
            for out in std::iter::once(l.output).chain(l.second) {
                let r = root(&mut parent, out);
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
            let r = root(&mut parent, l.input);
            readers[r] = match readers[r] {
                None => Some(Some(l.partition)),
                Some(Some(q)) if q == l.partition => Some(Some(q)),
                _ => Some(None),
            };
        }
    }
    Ok((0..n)
        .map(|v| {
            let r = root(&mut parent, v);
            fixed[r].or(readers[r].flatten()).unwrap_or(0)
        })
        .collect())
}
