//! Translation between async-nats stream info/config and sink-core's broker-neutral [`StreamFacts`].

use async_nats::jetstream::stream::{Config, DiscardPolicy, Info, RetentionPolicy, StorageType};
use sink_core::stream::{DiscardKind, RetentionKind, StorageKind, StreamFacts};

/// The facts `verify` needs, read from a stream's info.
pub fn facts_from_info(info: Info) -> StreamFacts {
    let c = info.config;
    StreamFacts {
        name: c.name,
        subjects: c.subjects,
        max_age: c.max_age,
        duplicate_window: c.duplicate_window,
        storage: match c.storage {
            StorageType::File => StorageKind::File,
            StorageType::Memory => StorageKind::Memory,
        },
        retention: match c.retention {
            RetentionPolicy::Limits => RetentionKind::Limits,
            RetentionPolicy::Interest => RetentionKind::Interest,
            RetentionPolicy::WorkQueue => RetentionKind::WorkQueue,
        },
        discard: match c.discard {
            DiscardPolicy::Old => DiscardKind::Old,
            DiscardPolicy::New => DiscardKind::New,
        },
        replicas: u32::try_from(c.num_replicas).unwrap_or(u32::MAX),
        sealed: c.sealed,
        no_ack: c.no_ack,
        max_msgs: c.max_messages,
        max_bytes: c.max_bytes,
        max_msg_size: c.max_message_size,
        deny_delete: c.deny_delete,
        deny_purge: c.deny_purge,
    }
}

/// The config the `Create` policy uses: sink-core's recommended facts (file storage, max_age 90
/// days, duplicate window 2 min) as an async-nats stream config.
pub fn new_stream_config(name: &str, subjects: Vec<String>) -> Config {
    let facts = StreamFacts::recommended(name, subjects);
    Config {
        name: facts.name,
        subjects: facts.subjects,
        max_age: facts.max_age,
        duplicate_window: facts.duplicate_window,
        storage: StorageType::File,
        retention: RetentionPolicy::Limits,
        discard: DiscardPolicy::Old,
        num_replicas: facts.replicas as usize,
        max_messages: facts.max_msgs,
        max_bytes: facts.max_bytes,
        max_message_size: facts.max_msg_size,
        ..Config::default()
    }
}
