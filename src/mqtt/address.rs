//! Broker addresses in the forms proplets accept: `tcp://`, `mqtt://` (plain), `ssl://`, `tls://`,
//! `mqtts://` (TLS, default port 8883), `host:port`, `[v6]:port`, or a bare host (1883).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

pub fn parse(address: &str) -> Result<BrokerAddress, String> {
    let address = address.trim();
    let (tls, rest) = match address.split_once("://") {
        Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
            "tcp" | "mqtt" => (false, rest),
            "ssl" | "tls" | "mqtts" => (true, rest),
            other => return Err(format!("unsupported MQTT scheme {other:?} in {address:?}")),
        },
        None => (false, address),
    };
    let rest = rest.trim_end_matches('/');
    let default_port = if tls { 8883 } else { 1883 };
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed [ in {address:?}"))?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| format!("bad port in {address:?}"))?,
            None => default_port,
        };
        (host.to_string(), port)
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (
                h.to_string(),
                p.parse().map_err(|_| format!("bad port in {address:?}"))?,
            ),
            None => (rest.to_string(), default_port),
        }
    };
    if host.is_empty() {
        return Err(format!("no host in MQTT address {address:?}"));
    }
    Ok(BrokerAddress { host, port, tls })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_form_proplets_accept() {
        let a = |h: &str, p, tls| BrokerAddress {
            host: h.into(),
            port: p,
            tls,
        };
        assert_eq!(
            parse("tcp://127.0.0.1:1884"),
            Ok(a("127.0.0.1", 1884, false))
        );
        assert_eq!(parse("mqtt://broker"), Ok(a("broker", 1883, false)));
        assert_eq!(parse("ssl://broker"), Ok(a("broker", 8883, true)));
        assert_eq!(parse("mqtts://broker:9000"), Ok(a("broker", 9000, true)));
        assert_eq!(parse("broker:1999"), Ok(a("broker", 1999, false)));
        assert_eq!(parse("[::1]:1999"), Ok(a("::1", 1999, false)));
        assert_eq!(parse("broker"), Ok(a("broker", 1883, false)));
        assert!(parse("ws://broker").is_err());
        assert!(parse("tcp://:1883").is_err());
        assert!(parse("tcp://h:notaport").is_err());
    }
}
