//! The spool's on-disk formats: the record (header + payload) and the segment header, with typed decode errors.
//!
//! All integers are little-endian. Every checksum is CRC32C, seeded with the segment's *salt*
//! (a random 64-bit value written in the segment header each time the segment is prepared), so
//! bytes left in a reused file by its previous life, or a payload that happens to contain a
//! record-shaped byte string, never pass as a record of the current life.
//!
//! ```text
//! segment header (64 bytes, offset 0)        record (28-byte header, then the payload)
//!  0..8   magic "JETSPOOL"                     0..4   crc32c(salt ++ bytes 4..28 ++ payload)
//!  8..10  format version (1)                   4      magic 0xA7
//! 10..16  zero                                 5      record format version (1)
//! 16..24  segment id                           6      kind: 1 data, 2 skip
//! 24..32  salt                                 7      zero
//! 32..40  segment size in bytes                8..12  payload length
//! 40..60  zero                                12..20  sequence (data) / first skipped (skip)
//! 60..64  crc32c(bytes 0..60)                 20..28  acked-through (data) / skipped count (skip)
//! ```
//!
//! A *skip* record marks a quarantined region: it covers `28 + length` bytes whose original
//! content was copied to the quarantine side file, and its checksum covers its header only (the
//! bytes it covers are damaged by definition).

use std::fmt;

use super::crc;

/// Sequence number of a spooled record, increasing from 1 in append order.
pub type RecordSeq = u64;

/// Length of the segment header; records start at this offset.
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 28;
/// The segment format this build writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// The record format this build writes and reads.
pub const RECORD_VERSION: u8 = 1;
/// First bytes of every segment file.
pub const SEGMENT_MAGIC: [u8; 8] = *b"JETSPOOL";
/// Fifth byte of every record.
pub const RECORD_MAGIC: u8 = 0xA7;

const KIND_DATA: u8 = 1;
const KIND_SKIP: u8 = 2;

/// A segment file's identity: a number assigned when the file is created, never reused by a
/// running spool. The file name carries it; the order of records comes from their sequences,
/// not from the names (a reused segment holds later records than files created after it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u64);

impl SegmentId {
    /// The segment's file name: `<id as 16 hex digits>.jspool`.
    pub fn file_name(self) -> String {
        format!("{:016x}.jspool", self.0)
    }

    /// The id in a file name made by [`SegmentId::file_name`]; `None` for any other name.
    pub fn from_file_name(name: &str) -> Option<SegmentId> {
        let hex = name.strip_suffix(".jspool")?;
        if hex.len() != 16 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u64::from_str_radix(hex, 16).ok().map(SegmentId)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file_name())
    }
}

/// The header at offset 0 of a segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// The segment's id (equal to the one in its file name).
    pub segment: SegmentId,
    /// The checksum seed of the records written in this life of the segment.
    pub salt: u64,
    /// The segment's size in bytes (records never extend past it).
    pub size: u64,
}

/// Why a segment header could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HeaderError {
    /// The file is shorter than a header.
    #[error("segment file is {len} bytes, shorter than its {SEGMENT_HEADER_LEN}-byte header")]
    Short {
        /// The file's length.
        len: usize,
    },
    /// The file does not start with the spool magic.
    #[error("not a spool segment: the file does not start with \"JETSPOOL\"")]
    BadMagic,
    /// Written by a newer jetsink whose format this build does not know.
    #[error("segment format version {found} is newer than this build reads ({supported}); run the jetsink version that wrote this spool, or drain it with that version")]
    NewerVersion {
        /// The version in the file.
        found: u16,
        /// The newest version this build reads.
        supported: u16,
    },
    /// A version that no jetsink ever wrote (0).
    #[error("segment format version {found} is not a valid version")]
    InvalidVersion {
        /// The version in the file.
        found: u16,
    },
    /// The header's checksum does not match: the header is damaged.
    #[error("segment header checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        /// Checksum in the file.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
}

impl SegmentHeader {
    /// The 64 header bytes.
    pub fn encode(&self) -> [u8; SEGMENT_HEADER_LEN] {
        let mut b = [0u8; SEGMENT_HEADER_LEN];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.segment.0.to_le_bytes());
        b[24..32].copy_from_slice(&self.salt.to_le_bytes());
        b[32..40].copy_from_slice(&self.size.to_le_bytes());
        let crc = crc::checksum(&b[..60]);
        b[60..64].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Reads the header at the start of `bytes`. `Ok(None)` when the header is all zeros: a
    /// file that was created but never prepared, or whose header was erased before deletion.
    ///
    /// The version is checked before the checksum: a newer format may lay its header out
    /// differently, and a spool it wrote must be refused, never treated as damage.
    pub fn decode(bytes: &[u8]) -> Result<Option<SegmentHeader>, HeaderError> {
        let Some(b) = bytes.get(..SEGMENT_HEADER_LEN) else {
            if bytes.iter().all(|&x| x == 0) {
                return Ok(None);
            }
            return Err(HeaderError::Short { len: bytes.len() });
        };
        if b.iter().all(|&x| x == 0) {
            return Ok(None);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        let version = u16::from_le_bytes([b[8], b[9]]);
        if version > FORMAT_VERSION {
            return Err(HeaderError::NewerVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if version == 0 {
            return Err(HeaderError::InvalidVersion { found: version });
        }
        let stored = read_u32(b, 60);
        let computed = crc::checksum(&b[..60]);
        if stored != computed {
            return Err(HeaderError::BadCrc { stored, computed });
        }
        Ok(Some(SegmentHeader {
            segment: SegmentId(read_u64(b, 16)),
            salt: read_u64(b, 24),
            size: read_u64(b, 32),
        }))
    }
}

/// One record read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Record<'a> {
    /// An appended payload.
    Data {
        /// Its sequence.
        seq: RecordSeq,
        /// Every record up to this sequence was acknowledged by the broker when this one was
        /// written (0: none). Recovery does not replay them.
        acked_through: RecordSeq,
        /// The payload, as appended.
        payload: &'a [u8],
    },
    /// A quarantined region (see the module docs).
    Skip {
        /// The first sequence missing because of the damage (0: not known).
        first_missing: RecordSeq,
        /// How many sequences are missing from `first_missing` on.
        missing: u64,
        /// Bytes the region covers, this header included.
        covered: u64,
    },
}

impl Record<'_> {
    /// Bytes this record takes in the segment.
    pub fn encoded_len(&self) -> usize {
        match self {
            Record::Data { payload, .. } => RECORD_HEADER_LEN + payload.len(),
            Record::Skip { covered, .. } => *covered as usize,
        }
    }
}

/// Why the bytes at an offset are not a valid record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The record (header, or the payload its header announces) runs past the bytes available:
    /// a torn or truncated write.
    #[error("record is torn: it needs {needed} bytes, {available} are there")]
    Short {
        /// Bytes the record needs.
        needed: usize,
        /// Bytes available.
        available: usize,
    },
    /// No record starts here (zeroed space, or garbage).
    #[error("no record here: magic byte is {found:#04x}, expected {RECORD_MAGIC:#04x}")]
    BadMagic {
        /// The byte found.
        found: u8,
    },
    /// A record version this build does not know.
    #[error(
        "record format version {found} is not readable by this build (it reads {RECORD_VERSION})"
    )]
    UnknownVersion {
        /// The version found.
        found: u8,
    },
    /// A record kind this build does not know, or reserved bits set.
    #[error("unknown record kind {kind} (flags {flags:#04x})")]
    UnknownKind {
        /// The kind byte.
        kind: u8,
        /// The reserved byte.
        flags: u8,
    },
    /// A data record with an empty payload (a zeroed length field).
    #[error("data record with zero length")]
    ZeroLength,
    /// A length larger than the segment could hold.
    #[error("record length {len} exceeds the {max} bytes that can follow it in the segment")]
    TooLarge {
        /// The length field.
        len: u64,
        /// The largest length possible here.
        max: u64,
    },
    /// The checksum does not match: some byte of the record changed.
    #[error("record checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BadCrc {
        /// Checksum in the record.
        stored: u32,
        /// Checksum of the bytes read.
        computed: u32,
    },
}

/// Bytes a data record with a payload of `payload_len` bytes takes.
pub fn data_record_len(payload_len: usize) -> usize {
    RECORD_HEADER_LEN + payload_len
}

/// Appends an encoded data record to `out`.
pub fn encode_data(
    out: &mut Vec<u8>,
    salt: u64,
    seq: RecordSeq,
    acked_through: RecordSeq,
    payload: &[u8],
) {
    let len = u32::try_from(payload.len()).expect("payload length checked against max_record");
    let header = header_bytes(KIND_DATA, len, seq, acked_through, salt, payload);
    out.extend_from_slice(&header);
    out.extend_from_slice(payload);
}

/// The header of a skip record covering `covered` bytes (at least [`RECORD_HEADER_LEN`]).
pub fn encode_skip(
    salt: u64,
    first_missing: RecordSeq,
    missing: u64,
    covered: u64,
) -> [u8; RECORD_HEADER_LEN] {
    let len = u32::try_from(covered - RECORD_HEADER_LEN as u64).expect("regions fit a segment");
    header_bytes(KIND_SKIP, len, first_missing, missing, salt, &[])
}

fn header_bytes(
    kind: u8,
    len: u32,
    seq: u64,
    aux: u64,
    salt: u64,
    payload: &[u8],
) -> [u8; RECORD_HEADER_LEN] {
    let mut h = [0u8; RECORD_HEADER_LEN];
    h[4] = RECORD_MAGIC;
    h[5] = RECORD_VERSION;
    h[6] = kind;
    h[8..12].copy_from_slice(&len.to_le_bytes());
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h[20..28].copy_from_slice(&aux.to_le_bytes());
    let crc = record_crc(salt, &h, payload);
    h[0..4].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_crc(salt: u64, header: &[u8], payload: &[u8]) -> u32 {
    let crc = crc::append(
        crc::checksum(&salt.to_le_bytes()),
        &header[4..RECORD_HEADER_LEN],
    );
    crc::append(crc, payload)
}

/// What a record header claims, before its checksum is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claimed {
    /// The sequence field.
    pub seq: RecordSeq,
    /// Bytes the record would take.
    pub len: u64,
}

/// Reads the header fields at the start of `bytes` when they look like one of ours (magic and
/// version right), whatever the checksum says: recovery uses it to tell a torn record of the
/// current life from leftover bytes.
pub fn claimed(bytes: &[u8]) -> Option<Claimed> {
    let h = bytes.get(..RECORD_HEADER_LEN)?;
    if h[4] != RECORD_MAGIC || h[5] != RECORD_VERSION {
        return None;
    }
    Some(Claimed {
        seq: read_u64(h, 12),
        len: RECORD_HEADER_LEN as u64 + u64::from(read_u32(h, 8)),
    })
}

/// Decodes the record at the start of `bytes`, checksummed with `salt`.
pub fn decode_record(bytes: &[u8], salt: u64) -> Result<Record<'_>, DecodeError> {
    let Some(h) = bytes.get(..RECORD_HEADER_LEN) else {
        if let Some(&found) = bytes.get(4) {
            if found != RECORD_MAGIC {
                return Err(DecodeError::BadMagic { found });
            }
        }
        return Err(DecodeError::Short {
            needed: RECORD_HEADER_LEN,
            available: bytes.len(),
        });
    };
    if h[4] != RECORD_MAGIC {
        return Err(DecodeError::BadMagic { found: h[4] });
    }
    if h[5] != RECORD_VERSION {
        return Err(DecodeError::UnknownVersion { found: h[5] });
    }
    let (kind, flags) = (h[6], h[7]);
    if !matches!(kind, KIND_DATA | KIND_SKIP) || flags != 0 {
        return Err(DecodeError::UnknownKind { kind, flags });
    }
    let len = u64::from(read_u32(h, 8));
    if kind == KIND_DATA && len == 0 {
        return Err(DecodeError::ZeroLength);
    }
    let stored = read_u32(h, 0);
    let seq = read_u64(h, 12);
    let aux = read_u64(h, 20);
    if kind == KIND_SKIP {
        let computed = record_crc(salt, h, &[]);
        if stored != computed {
            return Err(DecodeError::BadCrc { stored, computed });
        }
        return Ok(Record::Skip {
            first_missing: seq,
            missing: aux,
            covered: RECORD_HEADER_LEN as u64 + len,
        });
    }
    let available = (bytes.len() - RECORD_HEADER_LEN) as u64;
    if len > available {
        return Err(DecodeError::Short {
            needed: RECORD_HEADER_LEN + len as usize,
            available: bytes.len(),
        });
    }
    let payload = &bytes[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len as usize];
    let computed = record_crc(salt, h, payload);
    if stored != computed {
        return Err(DecodeError::BadCrc { stored, computed });
    }
    Ok(Record::Data {
        seq,
        acked_through: aux,
        payload,
    })
}

fn read_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn read_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SALT: u64 = 0x5eed_0000_0000_0001;

    fn data(seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        encode_data(&mut out, SALT, seq, seq.saturating_sub(3), payload);
        out
    }

    #[test]
    fn a_data_record_round_trips() {
        let bytes = data(42, b"hello spool");
        assert_eq!(bytes.len(), data_record_len(11));
        assert_eq!(
            decode_record(&bytes, SALT),
            Ok(Record::Data {
                seq: 42,
                acked_through: 39,
                payload: b"hello spool"
            })
        );
        // Trailing bytes after the record do not matter.
        let mut longer = bytes.clone();
        longer.extend_from_slice(&[0xEE; 9]);
        assert_eq!(
            decode_record(&longer, SALT).map(|r| r.encoded_len()),
            Ok(bytes.len())
        );
    }

    #[test]
    fn a_skip_record_round_trips_and_ignores_what_it_covers() {
        let mut region = vec![0xBAu8; 100];
        region[..RECORD_HEADER_LEN].copy_from_slice(&encode_skip(SALT, 7, 2, 100));
        assert_eq!(
            decode_record(&region, SALT),
            Ok(Record::Skip {
                first_missing: 7,
                missing: 2,
                covered: 100
            })
        );
    }

    /// Each damage and the typed error it must produce.
    #[test]
    fn damage_is_reported_by_kind() {
        let good = data(5, b"payload!");
        let flip = |at: usize, mask: u8| {
            let mut b = good.clone();
            b[at] ^= mask;
            b
        };
        let zero_len = {
            let mut b = good.clone();
            b[8..12].fill(0);
            b
        };
        let long_len = {
            let mut b = good.clone();
            b[8..12].copy_from_slice(&1000u32.to_le_bytes());
            b
        };
        let cases: Vec<(&str, Vec<u8>, DecodeError)> = vec![
            (
                "torn payload",
                good[..good.len() - 1].to_vec(),
                DecodeError::Short {
                    needed: 36,
                    available: 35,
                },
            ),
            (
                "torn header",
                good[..10].to_vec(),
                DecodeError::Short {
                    needed: 28,
                    available: 10,
                },
            ),
            ("zeroed", vec![0u8; 40], DecodeError::BadMagic { found: 0 }),
            ("zeroed length", zero_len, DecodeError::ZeroLength),
            (
                "length past the end",
                long_len,
                DecodeError::Short {
                    needed: 1028,
                    available: 36,
                },
            ),
            (
                "newer record version",
                flip(5, 0x02),
                DecodeError::UnknownVersion { found: 3 },
            ),
            (
                "unknown kind",
                flip(6, 0x04),
                DecodeError::UnknownKind { kind: 5, flags: 0 },
            ),
            (
                "reserved bits",
                flip(7, 0x01),
                DecodeError::UnknownKind { kind: 1, flags: 1 },
            ),
        ];
        for (what, bytes, expected) in cases {
            assert_eq!(decode_record(&bytes, SALT), Err(expected), "{what}");
        }
        // Any flipped bit in the checksummed bytes (crc, length, sequence, acked, payload) fails
        // the checksum, or an earlier check when it hits magic/version/kind/flags.
        for at in (0..4).chain(8..good.len()) {
            for bit in 0..8 {
                let damaged = flip(at, 1 << bit);
                let err = decode_record(&damaged, SALT).expect_err("damage detected");
                assert!(
                    matches!(
                        err,
                        DecodeError::BadCrc { .. }
                            | DecodeError::Short { .. }
                            | DecodeError::ZeroLength
                    ),
                    "byte {at} bit {bit}: {err:?}"
                );
            }
        }
    }

    #[test]
    fn another_salt_never_validates() {
        let bytes = data(1, b"from an earlier life of this file");
        assert!(matches!(
            decode_record(&bytes, SALT ^ 1),
            Err(DecodeError::BadCrc { .. })
        ));
    }

    #[test]
    fn segment_header_round_trips_and_refuses_newer_versions() {
        let header = SegmentHeader {
            segment: SegmentId(9),
            salt: SALT,
            size: 4096,
        };
        let bytes = header.encode();
        assert_eq!(SegmentHeader::decode(&bytes), Ok(Some(header)));
        assert_eq!(SegmentHeader::decode(&[0u8; 64]), Ok(None));
        assert_eq!(SegmentHeader::decode(&[]), Ok(None));
        assert_eq!(
            SegmentHeader::decode(&bytes[..20]),
            Err(HeaderError::Short { len: 20 })
        );
        let mut newer = bytes;
        newer[8..10].copy_from_slice(&2u16.to_le_bytes());
        assert_eq!(
            SegmentHeader::decode(&newer),
            Err(HeaderError::NewerVersion {
                found: 2,
                supported: 1
            })
        );
        let mut damaged = bytes;
        damaged[30] ^= 0x10;
        assert!(matches!(
            SegmentHeader::decode(&damaged),
            Err(HeaderError::BadCrc { .. })
        ));
        let mut foreign = bytes;
        foreign[0] = b'X';
        assert_eq!(SegmentHeader::decode(&foreign), Err(HeaderError::BadMagic));
    }

    #[test]
    fn segment_file_names_round_trip() {
        let id = SegmentId(0x1f);
        assert_eq!(id.file_name(), "000000000000001f.jspool");
        assert_eq!(SegmentId::from_file_name(&id.file_name()), Some(id));
        for other in [
            "1f.jspool",
            "000000000000001f.seg",
            "zz00000000000001.jspool",
        ] {
            assert_eq!(SegmentId::from_file_name(other), None, "{other}");
        }
    }
}
