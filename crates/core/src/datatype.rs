//! Tensor element types as the KServe v2 protocol names them ("FP32", "BYTES", ...).

use std::fmt;

use infermesh_proto::DataType as ConfigType;

/// One tensor element type of the KServe v2 protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    U8,
    U16,
    U32,
    U64,
    I8,
    I16,
    I32,
    I64,
    F16,
    BF16,
    F32,
    F64,
    /// Variable-length byte strings; on the wire each element is a u32 little-endian
    /// length followed by that many bytes.
    Bytes,
}

impl DataType {
    pub const ALL: [DataType; 14] = [
        Self::Bool,
        Self::U8,
        Self::U16,
        Self::U32,
        Self::U64,
        Self::I8,
        Self::I16,
        Self::I32,
        Self::I64,
        Self::F16,
        Self::BF16,
        Self::F32,
        Self::F64,
        Self::Bytes,
    ];

    /// The protocol's name for this type, e.g. "FP32".
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Bool => "BOOL",
            Self::U8 => "UINT8",
            Self::U16 => "UINT16",
            Self::U32 => "UINT32",
            Self::U64 => "UINT64",
            Self::I8 => "INT8",
            Self::I16 => "INT16",
            Self::I32 => "INT32",
            Self::I64 => "INT64",
            Self::F16 => "FP16",
            Self::BF16 => "BF16",
            Self::F32 => "FP32",
            Self::F64 => "FP64",
            Self::Bytes => "BYTES",
        }
    }

    /// Parses a protocol datatype string; `None` for anything else.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// FP16, BF16, FP32 or FP64.
    pub fn is_float(self) -> bool {
        matches!(self, Self::F16 | Self::BF16 | Self::F32 | Self::F64)
    }

    /// Bytes per element, or `None` for variable-length BYTES.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::U8 | Self::I8 => 1,
            Self::U16 | Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::U32 | Self::I32 | Self::F32 => 4,
            Self::U64 | Self::I64 | Self::F64 => 8,
            Self::Bytes => return None,
        })
    }

    /// The model-configuration enum value (`TYPE_FP32`, ...).
    pub fn to_config(self) -> ConfigType {
        match self {
            Self::Bool => ConfigType::TypeBool,
            Self::U8 => ConfigType::TypeUint8,
            Self::U16 => ConfigType::TypeUint16,
            Self::U32 => ConfigType::TypeUint32,
            Self::U64 => ConfigType::TypeUint64,
            Self::I8 => ConfigType::TypeInt8,
            Self::I16 => ConfigType::TypeInt16,
            Self::I32 => ConfigType::TypeInt32,
            Self::I64 => ConfigType::TypeInt64,
            Self::F16 => ConfigType::TypeFp16,
            Self::BF16 => ConfigType::TypeBf16,
            Self::F32 => ConfigType::TypeFp32,
            Self::F64 => ConfigType::TypeFp64,
            Self::Bytes => ConfigType::TypeString,
        }
    }

    /// From the raw enum value of a config field (`data_type: i32` in generated code);
    /// `None` for TYPE_INVALID or an unknown value.
    pub fn from_config_value(t: i32) -> Option<Self> {
        ConfigType::try_from(t).ok().and_then(Self::from_config)
    }

    /// From the model-configuration enum; `None` for TYPE_INVALID.
    pub fn from_config(t: ConfigType) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.to_config() == t)
    }
}

impl fmt::Display for DataType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
