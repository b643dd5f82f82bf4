//! TODO(helper): faulty backend.
