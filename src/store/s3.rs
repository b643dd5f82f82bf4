//! TODO(helper): s3 backend.
