//! Error helpers shared by the modules.

/// The error and its causes on one line. Client libraries put the useful
/// part ("connection refused", "certificate unknown") in the causes.
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let msg = c.to_string();
        if !s.contains(&msg) {
            s.push_str(": ");
            s.push_str(&msg);
        }
        cur = c.source();
    }
    s
}
