//! TODO(helper): memory backend.
