//! CORS: the `--cors-*` flags and the tower-http layer they make. The flags are checked when the
//! layer is made, at start: a bad value, or credentials with a wildcard that browsers refuse them
//! with (tower-http panics on that combination), is an error naming the flag.

use axum::http::header::CONTENT_TYPE;
use axum::http::{HeaderName, HeaderValue, Method};
use tower_http::cors::{AllowHeaders, AllowMethods, AllowOrigin, CorsLayer, ExposeHeaders};

/// The CORS flags. An absent flag keeps the default: any origin, methods GET and POST, the
/// `Content-Type` request header, no exposed response header, no credentials.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct CorsOptions {
    /// Origins allowed by CORS (repeatable, or comma-separated in the variable; `*`: any); any
    /// origin when absent.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_origin: Vec<String>,
    /// Request headers browsers may send (CORS; repeatable, or comma-separated in the variable;
    /// `*`: any); `Content-Type` when absent.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_header: Vec<String>,
    /// Response headers browsers let scripts read (CORS; repeatable, or comma-separated in the
    /// variable; `*`: any); none beyond the always-safe ones when absent.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_expose_header: Vec<String>,
    /// HTTP methods browsers may use (CORS; repeatable, or comma-separated in the variable; `*`:
    /// any); GET and POST when absent.
    #[arg(long, env, value_delimiter = ',')]
    pub cors_allow_method: Vec<String>,
    /// Let browsers send credentials (cookies, HTTP authentication) with cross-origin requests
    /// (`Access-Control-Allow-Credentials: true`). Needs `--cors-allow-origin`, and no `*` in the
    /// other CORS flags: browsers refuse credentials with a wildcard.
    #[arg(
        long,
        env,
        num_args = 0..=1,
        default_missing_value = "true",
        default_value_t = false,
        action = clap::ArgAction::Set
    )]
    pub cors_allow_credentials: bool,
}

/// A flag's values: trimmed, without empty ones; None for the wildcard `*`.
fn values(list: &[String]) -> Option<Vec<&str>> {
    let values: Vec<&str> = list
        .iter()
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
        .collect();
    (!values.contains(&"*")).then_some(values)
}

/// Parses each value, or names the flag and the value it cannot use.
fn parse<T>(
    values: &[&str],
    flag: &str,
    what: &str,
    parse: impl Fn(&str) -> Option<T>,
) -> Result<Vec<T>, String> {
    values
        .iter()
        .map(|v| parse(v).ok_or_else(|| format!("--{flag}: `{v}` is not a valid {what}")))
        .collect()
}

fn header_names(list: &[String], flag: &str) -> Result<Option<Vec<HeaderName>>, String> {
    values(list)
        .map(|v| parse(&v, flag, "header name", |v| v.parse().ok()))
        .transpose()
}

impl CorsOptions {
    /// The layer of these settings; an error naming the flag for a value that cannot be used.
    pub fn layer(&self) -> Result<CorsLayer, String> {
        // None: the wildcard.
        let origins = values(&self.cors_allow_origin)
            .map(|v| parse(&v, "cors-allow-origin", "origin", |v| v.parse().ok()))
            .transpose()?;
        let methods = values(&self.cors_allow_method)
            .map(|v| {
                let method = |v: &str| Method::from_bytes(v.to_ascii_uppercase().as_bytes()).ok();
                parse(&v, "cors-allow-method", "HTTP method", method)
            })
            .transpose()?;
        let allow_headers = header_names(&self.cors_allow_header, "cors-allow-header")?;
        let expose_headers = header_names(&self.cors_expose_header, "cors-expose-header")?;
        let origin = match origins {
            Some(o) if !o.is_empty() => AllowOrigin::list::<Vec<HeaderValue>>(o),
            _ => AllowOrigin::any(),
        };
        let methods = match methods {
            Some(m) if m.is_empty() => AllowMethods::list([Method::GET, Method::POST]),
            Some(m) => AllowMethods::list(m),
            None => AllowMethods::any(),
        };
        let allow_headers = match allow_headers {
            Some(h) if h.is_empty() => AllowHeaders::list([CONTENT_TYPE]),
            Some(h) => AllowHeaders::list(h),
            None => AllowHeaders::any(),
        };
        let expose_headers = match expose_headers {
            Some(h) => ExposeHeaders::list(h),
            None => ExposeHeaders::any(),
        };
        if self.cors_allow_credentials {
            self.check_credentials()?;
        }
        Ok(CorsLayer::new()
            .allow_origin(origin)
            .allow_methods(methods)
            .allow_headers(allow_headers)
            .expose_headers(expose_headers)
            .allow_credentials(self.cors_allow_credentials))
    }

    /// Credentials need every list explicit: browsers refuse them with a wildcard, and
    /// tower-http panics on that combination.
    fn check_credentials(&self) -> Result<(), String> {
        let origins = values(&self.cors_allow_origin);
        if origins.as_ref().is_none_or(Vec::is_empty) {
            return Err("--cors-allow-credentials needs the origins named with \
                        --cors-allow-origin: browsers refuse credentials from any origin (`*`)"
                .into());
        }
        for (flag, list) in [
            ("cors-allow-header", &self.cors_allow_header),
            ("cors-expose-header", &self.cors_expose_header),
            ("cors-allow-method", &self.cors_allow_method),
        ] {
            if values(list).is_none() {
                return Err(format!(
                    "--cors-allow-credentials cannot be combined with --{flag} `*`: browsers \
                     refuse credentials with a wildcard; name them instead"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        cors: CorsOptions,
    }

    fn layer(args: &[&str]) -> Result<CorsLayer, String> {
        let cli = Cli::try_parse_from(std::iter::once("cli").chain(args.iter().copied()))
            .map_err(|e| e.to_string())?;
        let layer = cli.cors.layer()?;
        // tower-http checks its rules (and panics) when the layer is applied.
        let _ = axum::Router::<()>::new().layer(layer.clone());
        Ok(layer)
    }

    #[test]
    fn usable_settings_make_a_layer() {
        for args in [
            &[][..],
            &["--cors-allow-origin", "*"],
            &[
                "--cors-allow-origin",
                "http://a,http://b",
                "--cors-allow-header",
                "*",
            ],
            &["--cors-allow-method", "*", "--cors-expose-header", "*"],
            &[
                "--cors-allow-method",
                "get,Put",
                "--cors-allow-header",
                "X-Custom, authorization",
            ],
            &[
                "--cors-allow-origin=http://a",
                "--cors-allow-credentials",
                "--cors-allow-header=authorization",
                "--cors-expose-header=x-request-id",
            ],
            &["--cors-allow-credentials", "false"],
        ] {
            if let Err(e) = layer(args) {
                panic!("{args:?}: {e}");
            }
        }
    }

    #[test]
    fn credentials_with_a_wildcard_are_refused() {
        for (args, named) in [
            (&["--cors-allow-credentials"][..], "--cors-allow-origin"),
            (
                &[
                    "--cors-allow-credentials",
                    "true",
                    "--cors-allow-origin",
                    "*",
                ],
                "--cors-allow-origin",
            ),
            (
                &[
                    "--cors-allow-credentials",
                    "--cors-allow-origin",
                    "http://a",
                    "--cors-allow-header",
                    "*",
                ],
                "--cors-allow-header `*`",
            ),
            (
                &[
                    "--cors-allow-credentials",
                    "--cors-allow-origin",
                    "http://a",
                    "--cors-allow-method",
                    "*",
                ],
                "--cors-allow-method `*`",
            ),
            (
                &[
                    "--cors-allow-credentials",
                    "--cors-allow-origin",
                    "http://a",
                    "--cors-expose-header",
                    "*",
                ],
                "--cors-expose-header `*`",
            ),
        ] {
            let error = layer(args).unwrap_err();
            assert!(error.starts_with("--cors-allow-credentials"), "{error}");
            assert!(error.contains(named), "{args:?}: {error}");
        }
    }

    #[test]
    fn bad_values_are_refused_with_the_flag_named() {
        for (args, expected) in [
            (
                &["--cors-allow-header", "x bad"][..],
                "--cors-allow-header: `x bad` is not a valid header name",
            ),
            (
                &["--cors-expose-header", "ok,(no)"],
                "--cors-expose-header: `(no)` is not a valid header name",
            ),
            (
                &["--cors-allow-method", "GET,PO ST"],
                "--cors-allow-method: `PO ST` is not a valid HTTP method",
            ),
            (
                &["--cors-allow-origin", "http://a\u{7f}"],
                "--cors-allow-origin: `http://a\u{7f}` is not a valid origin",
            ),
        ] {
            assert_eq!(layer(args).unwrap_err(), expected);
        }
        let error = layer(&["--cors-allow-credentials", "maybe"]).unwrap_err();
        assert!(error.contains("invalid value 'maybe'"), "{error}");
    }
}
