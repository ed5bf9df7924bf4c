//! Names of the objects the operator creates: valid Kubernetes names whatever the user's names are, and
//! the same on every run and every version of the operator (a restarted operator must find the object it
//! created before, so the hash is fixed here rather than taken from `std`, whose hasher may change).

/// FNV-1a, 64 bits: stable across platforms and releases.
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// `base` + `suffix` as a DNS-1123 label of at most `max` characters: lower-cased, characters other than
/// `[a-z0-9-]` turned into `-`; when too long, `base` is cut and a hash of the whole base keeps names apart.
pub fn bounded_name(base: &str, suffix: &str, max: usize) -> String {
    let clean: String = base
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    let clean = clean.trim_matches('-');
    let clean = if clean.is_empty() { "x" } else { clean };
    if clean.len() + suffix.len() <= max && clean == base {
        return format!("{clean}{suffix}");
    }
    let hash = format!("{:010x}", stable_hash(base) & 0xff_ffff_ffff);
    let room = max.saturating_sub(suffix.len() + hash.len() + 1);
    let head = clean[..clean.len().min(room)].trim_end_matches('-');
    format!("{head}-{hash}{suffix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_label(s: &str) -> bool {
        s.len() <= 63
            && !s.starts_with('-')
            && !s.ends_with('-')
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    }

    #[test]
    fn short_valid_names_are_kept() {
        assert_eq!(bounded_name("add", "-1", 63), "add-1");
    }

    #[test]
    fn long_or_odd_names_become_distinct_valid_labels() {
        let a = bounded_name(&"a".repeat(200), "-1", 63);
        let b = bounded_name(&format!("{}b", "a".repeat(199)), "-1", 63);
        assert!(is_label(&a) && is_label(&b), "{a} {b}");
        assert_ne!(a, b);
        let dotted = bounded_name("my.task.v2", "-3", 63);
        assert!(
            is_label(&dotted) && dotted.starts_with("my-task-v2-"),
            "{dotted}"
        );
        assert_ne!(dotted, bounded_name("my-task-v2", "-3", 63));
        assert!(is_label(&bounded_name("---", "", 63)));
        assert!(is_label(&bounded_name("Ünïcode_Name", "-9", 20)));
    }

    #[test]
    fn the_hash_does_not_change_between_versions() {
        assert_eq!(stable_hash(""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(stable_hash("a"), 0xaf63_dc4c_8601_ec8c);
    }
}
