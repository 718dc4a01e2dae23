//! encoding (being written).
