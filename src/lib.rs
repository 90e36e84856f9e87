//! Test support lives in tests/.
