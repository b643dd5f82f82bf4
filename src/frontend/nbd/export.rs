//! The set of exports a server offers: name → block device.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::protocol::MAX_STRING;
use crate::engine::BlockDevice;

/// One named export.
#[derive(Clone)]
pub struct Export {
    pub name: String,
    /// Free text shown to clients that ask for `NBD_INFO_DESCRIPTION`.
    pub description: String,
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size", &self.device.size())
            .finish()
    }
}

/// An export name the protocol cannot carry, or a duplicate.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExportError {
    #[error("export name {0:?} is longer than {MAX_STRING} bytes")]
    NameTooLong(String),
    #[error("export name {0:?} contains a NUL byte")]
    NulInName(String),
    #[error("export name {0:?} is given twice")]
    Duplicate(String),
}

/// Exports by name. Invariant: names are unique, at most 4096 bytes, no NUL.
#[derive(Clone, Debug, Default)]
pub struct ExportMap {
    by_name: BTreeMap<String, Export>,
}

impl ExportMap {
    /// Build a map from `(name, device)` pairs.
    pub fn new(
        devices: impl IntoIterator<Item = (String, Arc<dyn BlockDevice>)>,
    ) -> Result<ExportMap, ExportError> {
        let mut map = ExportMap::default();
        for (name, device) in devices {
            map.insert(Export {
                name,
                description: String::new(),
                device,
            })?;
        }
        Ok(map)
    }

    /// Add one export.
    pub fn insert(&mut self, export: Export) -> Result<(), ExportError> {
        let name = &export.name;
        if name.len() > MAX_STRING {
            return Err(ExportError::NameTooLong(name.clone()));
        }
        if name.contains('\0') {
            return Err(ExportError::NulInName(name.clone()));
        }
        if self.by_name.contains_key(name) {
            return Err(ExportError::Duplicate(name.clone()));
        }
        self.by_name.insert(name.clone(), export);
        Ok(())
    }

    /// Find an export by the name a client sent. The empty name (the
    /// protocol's "default export") selects the only export when there is
    /// exactly one, unless an export is literally named "".
    pub fn lookup(&self, name: &[u8]) -> Option<&Export> {
        let name = std::str::from_utf8(name).ok()?;
        if let Some(e) = self.by_name.get(name) {
            return Some(e);
        }
        if name.is_empty() && self.by_name.len() == 1 {
            return self.by_name.values().next();
        }
        None
    }

    /// Exports in name order.
    pub fn iter(&self) -> impl Iterator<Item = &Export> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::memdisk::MemDisk;

    fn disk() -> Arc<dyn BlockDevice> {
        Arc::new(MemDisk::new(4096))
    }

    #[test]
    fn lookup_rules() {
        let one = ExportMap::new([("a".to_string(), disk())]).unwrap();
        assert_eq!(one.lookup(b"a").unwrap().name, "a");
        assert_eq!(one.lookup(b"").unwrap().name, "a");
        assert!(one.lookup(b"b").is_none());
        assert!(one.lookup(&[0xff, 0xfe]).is_none());
        let two = ExportMap::new([("a".to_string(), disk()), ("b".to_string(), disk())]).unwrap();
        assert!(two.lookup(b"").is_none());
        assert_eq!(
            two.iter().map(|e| e.name.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
    }

    #[test]
    fn bad_names_rejected() {
        let long = "x".repeat(MAX_STRING + 1);
        assert!(matches!(
            ExportMap::new([(long, disk())]),
            Err(ExportError::NameTooLong(_))
        ));
        assert!(matches!(
            ExportMap::new([("a\0b".to_string(), disk())]),
            Err(ExportError::NulInName(_))
        ));
        assert!(matches!(
            ExportMap::new([("a".to_string(), disk()), ("a".to_string(), disk())]),
            Err(ExportError::Duplicate(_))
        ));
    }
}
