//! Structured inputs shared by the targets: JSON values and identifiers that
//! meet (or nearly meet) the protocol's rules, so that random inputs reach past the first
//! check of each parser.

use bolero::TypeGenerator;
use serde_json::{Map, Value};

/// A JSON value two levels deep at most.
#[derive(Debug, Clone, TypeGenerator)]
pub enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
    Str(String),
    Arr(Vec<Leaf>),
    Obj(Vec<(String, Leaf)>),
}

#[derive(Debug, Clone, TypeGenerator)]
pub enum Leaf {
    Null,
    Bool(bool),
    Int(i64),
    Str(String),
    Arr(Vec<u32>),
}

impl Leaf {
    pub fn value(&self) -> Value {
        match self {
            Leaf::Null => Value::Null,
            Leaf::Bool(b) => Value::Bool(*b),
            Leaf::Int(n) => Value::from(*n),
            Leaf::Str(s) => Value::String(s.clone()),
            Leaf::Arr(items) => Value::Array(items.iter().map(|n| Value::from(*n)).collect()),
        }
    }
}

impl Json {
    pub fn value(&self) -> Value {
        match self {
            Json::Null => Value::Null,
            Json::Bool(b) => Value::Bool(*b),
            Json::Int(n) => Value::from(*n),
            Json::Uint(n) => Value::from(*n),
            // Not finite: JSON has no such number, serde_json writes null.
            Json::Float(f) => Value::from(*f),
            Json::Str(s) => Value::String(s.clone()),
            Json::Arr(items) => Value::Array(items.iter().map(Leaf::value).collect()),
            Json::Obj(fields) => Value::Object(
                fields
                    .iter()
                    .map(|(k, v)| (k.clone(), v.value()))
                    .collect::<Map<_, _>>(),
            ),
        }
    }
}

/// Text over a small alphabet (the one of ids and event names, and a few characters that
/// are not in it), from generated indices: random strings would almost never be valid ids.
pub fn text(indices: &[u8], alphabet: &[u8]) -> String {
    indices
        .iter()
        .map(|i| alphabet[usize::from(*i) % alphabet.len()] as char)
        .collect()
}

/// The characters of organization ids and event names, and a few outside both.
pub const ID_ALPHABET: &[u8] =
    b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-:/ \"\\\x01";
