//! `qudata-agent doctor`.
