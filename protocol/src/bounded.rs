//! Collections whose length is capped at decode time, before anything is allocated.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::marker::PhantomData;
use core::ops::Deref;

use serde::de::{self, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A value was longer than its wire cap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{len} exceeds the limit of {max}")]
pub struct TooLong {
    /// The length that was offered.
    pub len: usize,
    /// The cap.
    pub max: usize,
}

/// A `Vec<T>` of at most `N` elements. Decoding refuses a longer sequence from its declared
/// length alone, before allocating.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BoundedVec<T, const N: usize>(Vec<T>);

impl<T, const N: usize> BoundedVec<T, N> {
    /// An empty vector.
    pub const fn new() -> Self {
        Self(Vec::new())
    }

    /// Wraps `items`, refusing more than `N`.
    pub fn try_from_vec(items: Vec<T>) -> Result<Self, TooLong> {
        if items.len() > N {
            return Err(TooLong { len: items.len(), max: N });
        }
        Ok(Self(items))
    }

    /// Appends `item`, refusing to grow past `N`.
    pub fn try_push(&mut self, item: T) -> Result<(), TooLong> {
        if self.0.len() >= N {
            return Err(TooLong { len: self.0.len() + 1, max: N });
        }
        self.0.push(item);
        Ok(())
    }

    /// The elements as a slice.
    pub fn as_slice(&self) -> &[T] {
        &self.0
    }

    /// The inner vector.
    pub fn into_vec(self) -> Vec<T> {
        self.0
    }
}

impl<T, const N: usize> Default for BoundedVec<T, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T, const N: usize> Deref for BoundedVec<T, N> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0
    }
}

impl<T: fmt::Debug, const N: usize> fmt::Debug for BoundedVec<T, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<T: Serialize, const N: usize> Serialize for BoundedVec<T, N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(serializer)
    }
}

impl<'de, T: Deserialize<'de>, const N: usize> Deserialize<'de> for BoundedVec<T, N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct BoundedVisitor<T, const N: usize>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>, const N: usize> Visitor<'de> for BoundedVisitor<T, N> {
            type Value = BoundedVec<T, N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a sequence of at most {N} elements")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let declared = seq.size_hint().unwrap_or(0);
                if declared > N {
                    return Err(de::Error::invalid_length(declared, &self));
                }
                let mut items = Vec::with_capacity(declared);
                while let Some(item) = seq.next_element()? {
                    if items.len() == N {
                        return Err(de::Error::invalid_length(N + 1, &self));
                    }
                    items.push(item);
                }
                Ok(BoundedVec(items))
            }
        }

        deserializer.deserialize_seq(BoundedVisitor::<T, N>(PhantomData))
    }
}

/// A UTF-8 string of at most `N` bytes, checked at decode time.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BoundedString<const N: usize>(String);

impl<const N: usize> BoundedString<N> {
    /// Wraps `s`, refusing more than `N` bytes.
    pub fn new(s: impl Into<String>) -> Result<Self, TooLong> {
        let s = s.into();
        if s.len() > N {
            return Err(TooLong { len: s.len(), max: N });
        }
        Ok(Self(s))
    }

    /// Wraps `s`, cutting it at a character boundary to fit `N` bytes.
    pub fn truncating(s: &str) -> Self {
        let mut end = s.len().min(N);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        Self(String::from(&s[..end]))
    }

    /// The string.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The inner string.
    pub fn into_string(self) -> String {
        self.0
    }
}

impl<const N: usize> Deref for BoundedString<N> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl<const N: usize> fmt::Debug for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const N: usize> fmt::Display for BoundedString<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<const N: usize> Serialize for BoundedString<N> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de, const N: usize> Deserialize<'de> for BoundedString<N> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct StrVisitor<const N: usize>;

        impl<const N: usize> Visitor<'_> for StrVisitor<N> {
            type Value = BoundedString<N>;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "a string of at most {N} bytes")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                if v.len() > N {
                    return Err(E::invalid_length(v.len(), &self));
                }
                Ok(BoundedString(String::from(v)))
            }
        }

        deserializer.deserialize_str(StrVisitor::<N>)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vec_over_cap_is_refused_from_its_declared_length() {
        // A postcard sequence claiming 2^32 elements with no bytes behind it: refused on the
        // declared length, so nothing is allocated.
        let bytes = [0xff, 0xff, 0xff, 0xff, 0x0f];
        let err = postcard::from_bytes::<BoundedVec<u8, 4>>(&bytes);
        assert!(err.is_err());
        let ok = postcard::from_bytes::<BoundedVec<u8, 4>>(&[2, 7, 9]).unwrap();
        assert_eq!(ok.as_slice(), &[7, 9]);
    }

    #[test]
    fn string_over_cap_is_refused() {
        let bytes = postcard::to_allocvec("hello").unwrap();
        assert!(postcard::from_bytes::<BoundedString<4>>(&bytes).is_err());
        assert_eq!(postcard::from_bytes::<BoundedString<5>>(&bytes).unwrap().as_str(), "hello");
        assert_eq!(BoundedString::<4>::truncating("héllo").as_str(), "hél");
        assert!(BoundedString::<2>::new("abc").is_err());
    }
}
