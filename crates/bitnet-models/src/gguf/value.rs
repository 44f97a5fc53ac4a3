//! GGUF metadata values: the thirteen value types of GGUF v3 and typed accessors.

use std::fmt;

/// The on-disk type tag of a GGUF metadata value (GGUF v3, ids 0-12).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u32)]
pub enum GgufValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl GgufValueType {
    /// Maps an on-disk tag to a type, `None` for an unknown tag.
    pub fn from_u32(tag: u32) -> Option<Self> {
        Some(match tag {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// Encoded size of one scalar of this type, `None` for strings and arrays.
    pub fn scalar_size(self) -> Option<usize> {
        Some(match self {
            Self::U8 | Self::I8 | Self::Bool => 1,
            Self::U16 | Self::I16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::String | Self::Array => return None,
        })
    }
}

/// One metadata value. Arrays keep their element type so that an empty array
/// round-trips with the type it was written with.
#[derive(Debug, Clone, PartialEq)]
pub enum MetadataValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(GgufValueType, Vec<MetadataValue>),
    U64(u64),
    I64(i64),
    F64(f64),
}

impl MetadataValue {
    pub fn value_type(&self) -> GgufValueType {
        match self {
            Self::U8(_) => GgufValueType::U8,
            Self::I8(_) => GgufValueType::I8,
            Self::U16(_) => GgufValueType::U16,
            Self::I16(_) => GgufValueType::I16,
            Self::U32(_) => GgufValueType::U32,
            Self::I32(_) => GgufValueType::I32,
            Self::F32(_) => GgufValueType::F32,
            Self::Bool(_) => GgufValueType::Bool,
            Self::String(_) => GgufValueType::String,
            Self::Array(..) => GgufValueType::Array,
            Self::U64(_) => GgufValueType::U64,
            Self::I64(_) => GgufValueType::I64,
            Self::F64(_) => GgufValueType::F64,
        }
    }

    /// Any integer value that is non-negative, as u64.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => Some(v),
            Self::I8(v) => u64::try_from(v).ok(),
            Self::I16(v) => u64::try_from(v).ok(),
            Self::I32(v) => u64::try_from(v).ok(),
            Self::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// Any integer value, as i64 (None if it does not fit).
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            Self::U8(v) => Some(v.into()),
            Self::U16(v) => Some(v.into()),
            Self::U32(v) => Some(v.into()),
            Self::U64(v) => i64::try_from(v).ok(),
            Self::I8(v) => Some(v.into()),
            Self::I16(v) => Some(v.into()),
            Self::I32(v) => Some(v.into()),
            Self::I64(v) => Some(v),
            _ => None,
        }
    }

    /// A float value (f32 or f64), or an integer converted to f64.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Self::F32(v) => Some(v.into()),
            Self::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            Self::Bool(v) => Some(v),
            _ => None,
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Self::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_array(&self) -> Option<(GgufValueType, &[MetadataValue])> {
        match self {
            Self::Array(t, values) => Some((*t, values)),
            _ => None,
        }
    }

    /// A string array as a vector of borrowed strings.
    pub fn as_str_array(&self) -> Option<Vec<&str>> {
        let (_, values) = self.as_array()?;
        values.iter().map(|v| v.as_str()).collect()
    }

    /// An integer array as i64s.
    pub fn as_i64_array(&self) -> Option<Vec<i64>> {
        let (_, values) = self.as_array()?;
        values.iter().map(|v| v.as_i64()).collect()
    }

    /// A float array as f32s.
    pub fn as_f32_array(&self) -> Option<Vec<f32>> {
        let (_, values) = self.as_array()?;
        values.iter().map(|v| v.as_f64().map(|x| x as f32)).collect()
    }

    /// Convenience constructor for string arrays.
    pub fn string_array<S: Into<String>>(items: impl IntoIterator<Item = S>) -> Self {
        Self::Array(GgufValueType::String, items.into_iter().map(|s| Self::String(s.into())).collect())
    }

    /// Convenience constructor for i32 arrays.
    pub fn i32_array(items: impl IntoIterator<Item = i32>) -> Self {
        Self::Array(GgufValueType::I32, items.into_iter().map(Self::I32).collect())
    }

    /// Convenience constructor for f32 arrays.
    pub fn f32_array(items: impl IntoIterator<Item = f32>) -> Self {
        Self::Array(GgufValueType::F32, items.into_iter().map(Self::F32).collect())
    }
}

impl fmt::Display for MetadataValue {
    /// Short human form: long arrays are summarised, long strings cut.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::U8(v) => write!(f, "{v}"),
            Self::I8(v) => write!(f, "{v}"),
            Self::U16(v) => write!(f, "{v}"),
            Self::I16(v) => write!(f, "{v}"),
            Self::U32(v) => write!(f, "{v}"),
            Self::I32(v) => write!(f, "{v}"),
            Self::F32(v) => write!(f, "{v}"),
            Self::Bool(v) => write!(f, "{v}"),
            Self::U64(v) => write!(f, "{v}"),
            Self::I64(v) => write!(f, "{v}"),
            Self::F64(v) => write!(f, "{v}"),
            Self::String(s) => {
                let cut: String = s.chars().take(60).collect();
                if cut.len() < s.len() {
                    write!(f, "{cut:?}...")
                } else {
                    write!(f, "{s:?}")
                }
            }
            Self::Array(t, values) => {
                write!(f, "[{t:?}; {}]", values.len())?;
                if values.len() <= 8 {
                    write!(f, " [")?;
                    for (i, v) in values.iter().enumerate() {
                        if i > 0 {
                            write!(f, ", ")?;
                        }
                        write!(f, "{v}")?;
                    }
                    write!(f, "]")?;
                }
                Ok(())
            }
        }
    }
}
