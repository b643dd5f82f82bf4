//! TODO(helper): retry backend.
