//! Dependency graphs of tasks: every `dependsOn` name must be a known task and the graph must have no
//! cycle. Checked before anything runs; the error names the missing task or the tasks of the cycle.
use std::collections::BTreeMap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::DiGraph;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DagError {
    #[error("task {task:?} depends on {missing:?}, which is not a task of this job")]
    Unknown { task: String, missing: String },
    #[error("dependency cycle: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
}

/// Checks `nodes` (task name → the names it depends on). Cycles are reported smallest first, each as a
/// path that returns to its start.
pub fn validate(nodes: &BTreeMap<String, Vec<String>>) -> Result<(), DagError> {
    let mut graph = DiGraph::<&str, ()>::new();
    let index: BTreeMap<&str, _> = nodes
        .keys()
        .map(|name| (name.as_str(), graph.add_node(name.as_str())))
        .collect();
    for (task, deps) in nodes {
        for dep in deps {
            let Some(&from) = index.get(dep.as_str()) else {
                return Err(DagError::Unknown {
                    task: task.clone(),
                    missing: dep.clone(),
                });
            };
            graph.add_edge(from, index[task.as_str()], ());
        }
    }
    let mut cycles: Vec<Vec<String>> = tarjan_scc(&graph)
        .into_iter()
        .filter(|scc| scc.len() > 1 || graph.contains_edge(scc[0], scc[0]))
        .map(|scc| {
            let mut names: Vec<String> = scc.iter().map(|&n| graph[n].to_string()).collect();
            names.sort();
            cycle_path(nodes, &names)
        })
        .collect();
    cycles.sort_by_key(Vec::len);
    match cycles.into_iter().next() {
        Some(cycle) => Err(DagError::Cycle(cycle)),
        None => Ok(()),
    }
}

/// A path through the strongly connected `members` that comes back to where it started, following
/// "depends on" edges from the alphabetically first member.
fn cycle_path(nodes: &BTreeMap<String, Vec<String>>, members: &[String]) -> Vec<String> {
    let start = members[0].clone();
    let mut path = vec![start.clone()];
    let mut current = start.clone();
    while path.len() <= members.len() {
        let next = nodes
            .get(&current)
            .into_iter()
            .flatten()
            .filter(|d| members.contains(d))
            .find(|d| **d == start || !path.contains(d));
        match next {
            Some(n) if *n == start => {
                path.push(start);
                return path;
            }
            Some(n) => {
                path.push(n.clone());
                current = n.clone();
            }
            None => break,
        }
    }
    // Not found greedily (several interleaved loops): the members are still the cycle.
    let mut all = members.to_vec();
    all.push(start);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    fn graph(edges: &[(&str, &[&str])]) -> BTreeMap<String, Vec<String>> {
        edges
            .iter()
            .map(|(t, deps)| (t.to_string(), deps.iter().map(|d| d.to_string()).collect()))
            .collect()
    }

    #[test]
    fn a_diamond_is_fine() {
        let g = graph(&[("a", &[]), ("b", &["a"]), ("c", &["a"]), ("d", &["b", "c"])]);
        assert_eq!(validate(&g), Ok(()));
    }

    #[test]
    fn cycles_and_unknown_names_are_named() {
        let g = graph(&[("a", &["c"]), ("b", &["a"]), ("c", &["b"]), ("d", &[])]);
        let e = validate(&g).expect_err("cycle");
        assert_eq!(
            e,
            DagError::Cycle(vec!["a".into(), "c".into(), "b".into(), "a".into()])
        );
        assert_eq!(e.to_string(), "dependency cycle: a -> c -> b -> a");
        let g = graph(&[("a", &["a"])]);
        assert_eq!(
            validate(&g),
            Err(DagError::Cycle(vec!["a".into(), "a".into()]))
        );
        let g = graph(&[("a", &[]), ("b", &["zz"])]);
        assert_eq!(
            validate(&g).expect_err("unknown").to_string(),
            "task \"b\" depends on \"zz\", which is not a task of this job"
        );
    }
}
