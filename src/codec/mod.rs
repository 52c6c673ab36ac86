//! Encodings of the event model. No I/O here: encoders write into buffers the caller
//! owns.

pub mod array;
pub mod avro;
pub mod connect;
pub mod json;
pub mod pgtext;

use std::fmt;

/// Short text formatted on the stack: numbers and timestamps that go out once per
/// change or value without a heap allocation each. Writing past `N` bytes fails.
#[derive(Clone, Copy)]
pub struct StackText<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackText<N> {
    pub fn new() -> Self {
        StackText {
            buf: [0; N],
            len: 0,
        }
    }

    /// `value`'s `Display` text. Callers size `N` for the longest text the type has.
    pub fn of(value: impl fmt::Display) -> Self {
        let mut t = StackText::new();
        let _ = fmt::Write::write_fmt(&mut t, format_args!("{value}"));
        t
    }

    /// `n` in decimal, as `Display` prints it, without `core::fmt` (which cost a
    /// percent of the CPU in the per-change Kafka headers).
    pub fn decimal(n: u64) -> Self {
        let mut t = StackText::new();
        pgtext::push_digits(&mut t, n, 1);
        t
    }

    /// PostgreSQL's `X/Y` text of `lsn` (upper-case hexadecimal halves), as its
    /// `Display` prints it, without `core::fmt`.
    pub fn lsn(lsn: crate::lsn::Lsn) -> Self {
        let mut t = StackText::new();
        t.push_hex((lsn.0 >> 32) as u32);
        let _ = fmt::Write::write_str(&mut t, "/");
        t.push_hex(lsn.0 as u32);
        t
    }

    /// Append ASCII bytes (the caller's guarantee); like `write_str`, nothing of them
    /// when they do not fit.
    pub(crate) fn push_ascii(&mut self, bytes: &[u8]) {
        debug_assert!(bytes.is_ascii());
        if let Some(room) = self.buf.get_mut(self.len..self.len + bytes.len()) {
            room.copy_from_slice(bytes);
            self.len += bytes.len();
        }
    }

    fn push_hex(&mut self, n: u32) {
        const DIGITS: &[u8; 16] = b"0123456789ABCDEF";
        let mut buf = [0u8; 8];
        let mut i = buf.len();
        let mut n = n;
        loop {
            i -= 1;
            buf[i] = DIGITS[(n & 0xF) as usize];
            n >>= 4;
            if n == 0 {
                break;
            }
        }
        // SAFETY: `buf[i..]` holds only ASCII hexadecimal digits.
        let _ = fmt::Write::write_str(self, unsafe { std::str::from_utf8_unchecked(&buf[i..]) });
    }
}

impl<const N: usize> Default for StackText<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for StackText<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.len + s.len();
        let room = self.buf.get_mut(self.len..end).ok_or(fmt::Error)?;
        room.copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

impl<const N: usize> std::ops::Deref for StackText<N> {
    type Target = str;
    fn deref(&self) -> &str {
        // Only whole `&str`s are ever copied in.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or_default()
    }
}

impl<const N: usize> fmt::Display for StackText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl<const N: usize> fmt::Debug for StackText<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&**self, f)
    }
}
