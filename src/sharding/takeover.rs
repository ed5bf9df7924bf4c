//! Takeover of a dead shard's proplets without a write per proplet. When the leader fences a silent shard
//! it records, in the same write that takes the Lease, the ring it fenced it against (the live members and
//! what the ring hashes). Every survivor reads that record from the Lease and owns, at once, the dead
//! shard's Proplets that this ring places on it; the leader relabels them to the same shards in the
//! background. One record, read by all, so every survivor computes the same owner for each proplet: no
//! proplet is owned twice, and none waits for its relabel. See docs/sharding.md.
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::ResourceExt;

use super::ring::{Ring, ShardBy, VIRTUAL_NODES};
use crate::api::proplet::Proplet;

/// On a fenced shard Lease: the ring its proplets are taken over by (`client-id:a,b` or `channel:a,b`).
pub const TAKEOVER_ANNOTATION: &str = "propeller.propeller.abstractmachines.fr/takeover";

/// Where a proplet's place on the ring is hashed from: its key (clientId, else name), or its channel
/// (`domain/channel`) when the ring groups by channel and it has one.
pub fn ring_position<'a>(key: &'a str, channel: Option<&'a str>, by: ShardBy) -> &'a str {
    match (by, channel) {
        (ShardBy::Channel, Some(channel)) => channel,
        _ => key,
    }
}

/// A Proplet's channel as the ring hashes it (`domain/channel`), if it has one.
pub fn channel_key(domain: Option<&str>, channel: &str) -> Option<String> {
    (!channel.is_empty()).then(|| format!("{}/{channel}", domain.unwrap_or_default()))
}

/// The ring a dead shard's proplets are taken over by.
#[derive(Clone, Debug)]
pub struct Takeover {
    by: ShardBy,
    virtual_nodes: usize,
    ring: Arc<Ring>,
}

/// The virtual nodes of a record that names none: those of the operators that wrote such records.
const UNNAMED_VIRTUAL_NODES: usize = 100;
/// The most virtual nodes a record may ask for (a record is read by every replica and each builds its
/// ring).
const MAX_VIRTUAL_NODES: usize = 10_000;

impl Takeover {
    pub fn new(by: ShardBy, members: impl IntoIterator<Item = String>) -> Takeover {
        Takeover::with_virtual_nodes(by, VIRTUAL_NODES, members)
    }

    fn with_virtual_nodes(
        by: ShardBy,
        virtual_nodes: usize,
        members: impl IntoIterator<Item = String>,
    ) -> Takeover {
        Takeover {
            by,
            virtual_nodes,
            ring: Arc::new(Ring::new(members, virtual_nodes)),
        }
    }

    /// The annotation's value.
    pub fn record(&self) -> String {
        format_record(
            self.by,
            self.virtual_nodes,
            self.ring.members().iter().cloned(),
        )
    }

    /// The annotation's value for a ring of these members, without building the ring:
    /// `client-id/1000:a,b` (what the ring hashes, its virtual nodes per shard, its members). The virtual
    /// nodes are named because every survivor must compute the same owner for each proplet, also while
    /// replicas of two versions run side by side: an operator that does not know the form reads no record
    /// (its proplets wait for their relabel), and a record without them was written with 100.
    pub fn record_of(by: ShardBy, members: impl IntoIterator<Item = String>) -> String {
        format_record(by, VIRTUAL_NODES, members)
    }

    /// Reads a record; None if it is not one (an older operator's fence carries none: its proplets then
    /// wait for their relabel).
    pub fn parse(record: &str) -> Option<Takeover> {
        let (ring, members) = record.split_once(':')?;
        let (by, virtual_nodes) = match ring.split_once('/') {
            Some((by, n)) => (by, n.parse().ok()?),
            None => (ring, UNNAMED_VIRTUAL_NODES),
        };
        if !(1..=MAX_VIRTUAL_NODES).contains(&virtual_nodes) {
            return None;
        }
        let by = match by {
            "client-id" => ShardBy::ClientId,
            "channel" => ShardBy::Channel,
            _ => return None,
        };
        let members: Vec<String> = members
            .split(',')
            .filter(|m| !m.is_empty())
            .map(str::to_string)
            .collect();
        (!members.is_empty()).then(|| Takeover::with_virtual_nodes(by, virtual_nodes, members))
    }

    /// The shard this ring places a proplet at `position` on.
    pub fn owner_at(&self, position: &str) -> Option<&str> {
        self.ring.owner(position)
    }

    /// The shard this ring places `p` on.
    pub fn owner(&self, p: &Proplet) -> Option<&str> {
        let cc = &p.spec.connection_config;
        let name = p.name_any();
        let key = cc.client().unwrap_or(&name);
        let channel = channel_key(cc.domain(), &cc.channel_id);
        self.owner_at(ring_position(key, channel.as_deref(), self.by))
    }

    pub fn by(&self) -> ShardBy {
        self.by
    }
}

fn format_record(
    by: ShardBy,
    virtual_nodes: usize,
    members: impl IntoIterator<Item = String>,
) -> String {
    let by = match by {
        ShardBy::ClientId => "client-id",
        ShardBy::Channel => "channel",
    };
    let mut members: Vec<String> = members.into_iter().collect();
    members.sort();
    members.dedup();
    format!("{by}/{virtual_nodes}:{}", members.join(","))
}

/// A takeover as a survivor knows it: the record, and when a list of the Leases last showed the shard
/// fenced with it. A survivor acts on what it took over only while that list is younger than the renew
/// deadline; a fenced shard that takes its Lease back waits as long before it acts (`membership`), so
/// the two never act at once.
#[derive(Clone, Debug)]
pub struct Known {
    pub takeover: Takeover,
    pub confirmed: Option<Instant>,
}

impl Known {
    pub fn confirmed_within(&self, window: Duration) -> bool {
        self.confirmed.is_some_and(|at| at.elapsed() < window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_reads_back_as_the_same_ring() {
        let t = Takeover::new(ShardBy::Channel, ["b".to_string(), "a".to_string()]);
        assert_eq!(t.record(), format!("channel/{VIRTUAL_NODES}:a,b"));
        assert_eq!(
            Takeover::record_of(ShardBy::Channel, ["b", "a", "b"].map(String::from)),
            t.record()
        );
        let back = Takeover::parse(&t.record()).expect("parses");
        assert_eq!(back.by(), ShardBy::Channel);
        for i in 0..200 {
            let key = format!("d/ch-{i}");
            assert_eq!(back.owner_at(&key), t.owner_at(&key));
        }
        assert!(Takeover::parse("client-id:").is_none(), "no member");
        assert!(Takeover::parse("nonsense").is_none());
        assert!(Takeover::parse("by-zone:a").is_none());
        assert!(
            Takeover::parse("client-id/0:a").is_none(),
            "no virtual node"
        );
        assert!(Takeover::parse("client-id/many:a").is_none());
        assert!(Takeover::parse("client-id/1000000:a").is_none(), "too dear");
    }

    /// A record written before records named their virtual nodes was computed with 100: a survivor of
    /// this version reads it as its writer meant it, so old and new survivors agree on every owner.
    #[test]
    fn a_record_without_virtual_nodes_is_read_with_the_hundred_it_was_written_with() {
        let members = ["a", "b", "c"].map(String::from);
        let old = Takeover::parse("client-id:a,b,c").expect("parses");
        assert_eq!(
            old.record(),
            "client-id/100:a,b,c",
            "it says what it was read as"
        );
        let hundred = Ring::new(members.clone(), 100);
        let now = Takeover::new(ShardBy::ClientId, members);
        let mut differ = 0;
        for i in 0..500 {
            let key = format!("client-{i}");
            assert_eq!(old.owner_at(&key), hundred.owner(&key), "{key}");
            differ += usize::from(old.owner_at(&key) != now.owner_at(&key));
        }
        assert!(
            differ > 0,
            "the two rings differ, so the record must say which"
        );
    }

    #[test]
    fn the_position_follows_what_the_ring_hashes() {
        assert_eq!(ring_position("c1", Some("d/ch"), ShardBy::ClientId), "c1");
        assert_eq!(ring_position("c1", Some("d/ch"), ShardBy::Channel), "d/ch");
        assert_eq!(ring_position("c1", None, ShardBy::Channel), "c1");
        assert_eq!(channel_key(None, "ch").as_deref(), Some("/ch"));
        assert_eq!(channel_key(Some("d"), ""), None);
    }
}
