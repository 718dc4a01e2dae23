//! subject (being written).
