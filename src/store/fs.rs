//! TODO(helper): fs backend.
