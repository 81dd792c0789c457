//! What the UDP tests add to the harness: which UDP ports are bound, and the largest datagram.

/// The largest UDP payload over IPv4.
pub const MAX_DATAGRAM: usize = 65_507;

/// Sockets bound to UDP port `port` (IPv4 or IPv6), read from /proc.
pub fn udp_sockets_on(port: u16) -> usize {
    let hex = format!(":{port:04X} ");
    ["/proc/net/udp", "/proc/net/udp6"]
        .iter()
        .map(|table| {
            std::fs::read_to_string(table).map_or(0, |text| {
                text.lines()
                    .skip(1)
                    .filter(|line| {
                        let local = line.split_whitespace().nth(1).unwrap_or("");
                        format!("{local} ").ends_with(&hex)
                    })
                    .count()
            })
        })
        .sum()
}
