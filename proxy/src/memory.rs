//! Giving memory back once configuration is compiled.

/// Drops the API descriptors (only needed to decode and render configuration) and asks the
/// allocator to return freed pages, so an idle proxy holds only what serving needs.
pub fn release_config_memory() {
    xds_client::TypeRegistry::release();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}
