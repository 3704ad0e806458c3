//! A small W3C WebDriver client (what the panel's test needs of chromedriver): sessions,
//! navigation, elements by CSS selector, clicks, typing, text, cookies and screenshots.
//!
//! Not a WebDriver crate: the one at hand (thirtyfour) turns on serde_json's
//! `preserve_order` for the whole workspace's tests, which would make the tests' JSON
//! differ from the coordinator's in production.

use serde_json::{Value, json};

/// The key W3C WebDriver names an element reference with.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    http: reqwest::Client,
    session: String,
}

#[derive(Debug)]
pub struct Failed(pub String);

pub struct Element<'a> {
    browser: &'a Browser,
    id: String,
}

impl Browser {
    /// A session of `binary` (Chromium) with `args`, through the chromedriver at `driver`.
    pub async fn start(driver: &str, binary: &str, args: &[String]) -> Browser {
        let http = reqwest::Client::new();
        let caps = json!({
            "capabilities": { "alwaysMatch": {
                "browserName": "chrome",
                "goog:chromeOptions": { "binary": binary, "args": args },
            }}
        });
        let resp: Value = http
            .post(format!("{driver}/session"))
            .json(&caps)
            .send()
            .await
            .expect("chromedriver answers")
            .json()
            .await
            .unwrap();
        let id = resp["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {resp}"));
        Browser {
            http,
            session: format!("{driver}/session/{id}"),
        }
    }

    async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, Failed> {
        let mut req = self.http.request(method, format!("{}{path}", self.session));
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(|e| Failed(e.to_string()))?;
        let ok = resp.status().is_success();
        let v: Value = resp.json().await.map_err(|e| Failed(e.to_string()))?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(Failed(
                v["value"]["message"].as_str().unwrap_or("").to_string(),
            ))
        }
    }

    async fn post(&self, path: &str, body: Value) -> Result<Value, Failed> {
        self.send(reqwest::Method::POST, path, Some(body)).await
    }

    async fn get(&self, path: &str) -> Result<Value, Failed> {
        self.send(reqwest::Method::GET, path, None).await
    }

    pub async fn goto(&self, url: &str) {
        self.post("/url", json!({ "url": url })).await.unwrap();
    }

    pub async fn url(&self) -> String {
        self.get("/url")
            .await
            .unwrap()
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// The first element `css` selects.
    pub async fn find(&self, css: &str) -> Result<Element<'_>, Failed> {
        let v = self
            .post("/element", json!({ "using": "css selector", "value": css }))
            .await?;
        Ok(Element {
            browser: self,
            id: v[ELEMENT].as_str().unwrap_or("").to_string(),
        })
    }

    /// How many elements `css` selects.
    pub async fn count(&self, css: &str) -> usize {
        self.post(
            "/elements",
            json!({ "using": "css selector", "value": css }),
        )
        .await
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
    }

    pub async fn cookie(&self, name: &str) -> Option<String> {
        let v = self.get(&format!("/cookie/{name}")).await.ok()?;
        v["value"].as_str().map(str::to_string)
    }

    /// A PNG of the window, written to `path`.
    pub async fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        let b64 = self.get("/screenshot").await.unwrap();
        let png = base64::engine::general_purpose::STANDARD
            .decode(b64.as_str().unwrap_or(""))
            .unwrap();
        std::fs::write(path, png).unwrap();
    }

    pub async fn quit(self) {
        let _ = self.send(reqwest::Method::DELETE, "", None).await;
    }
}

impl Element<'_> {
    fn path(&self, what: &str) -> String {
        format!("/element/{}/{what}", self.id)
    }

    pub async fn text(&self) -> Result<String, Failed> {
        let v = self.browser.get(&self.path("text")).await?;
        Ok(v.as_str().unwrap_or("").to_string())
    }

    pub async fn click(&self) {
        self.browser
            .post(&self.path("click"), json!({}))
            .await
            .unwrap();
    }

    pub async fn clear(&self) {
        self.browser
            .post(&self.path("clear"), json!({}))
            .await
            .unwrap();
    }

    pub async fn type_text(&self, text: &str) {
        self.browser
            .post(&self.path("value"), json!({ "text": text }))
            .await
            .unwrap();
    }
}
