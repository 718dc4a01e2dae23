//! backoff (being written).
