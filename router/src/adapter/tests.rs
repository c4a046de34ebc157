use super::*;
use ValidationError as E;

fn config() -> AdapterConfig {
    AdapterConfig {
        model_id: "org/base".into(),
        architecture: "LlamaForCausalLM".into(),
        ..Default::default()
    }
}

fn named(id: &str) -> AdapterFields<'_> {
    AdapterFields {
        adapter_id: Some(id),
        ..Default::default()
    }
}

fn merged(m: &MergedAdapters) -> Result<Option<AdapterRequest>, E> {
    resolve(
        &config(),
        AdapterFields {
            merged_adapters: Some(m),
            ..Default::default()
        },
    )
}

#[test]
fn base_default_and_named_adapters() {
    let c = config();
    assert!(resolve(&c, AdapterFields::default()).unwrap().is_none());
    assert!(resolve(&c, named("")).unwrap().is_none());
    assert!(resolve(&c, named("org/base")).unwrap().is_none());
    let a = resolve(&c, named("org/lora")).unwrap().unwrap();
    assert_eq!(*a.key, AdapterKey::single("org/lora", AdapterSource::Hub));
    assert_eq!(a.key.to_proto().adapter_ids, vec!["org/lora"]);

    let with_default = AdapterConfig {
        default_adapter_id: Some("org/default".into()),
        default_source: AdapterSource::Local,
        default_adapter_source: AdapterSource::S3,
        ..config()
    };
    let d = resolve(&with_default, AdapterFields::default())
        .unwrap()
        .unwrap();
    assert_eq!(*d.key, AdapterKey::single("org/default", AdapterSource::S3));
    // Naming the base model still means the base model; a named adapter without a source
    // takes the requests' default source, not the default adapter's.
    assert!(resolve(&with_default, named("org/base")).unwrap().is_none());
    let n = resolve(&with_default, named("x")).unwrap().unwrap();
    assert_eq!(n.key.source, AdapterSource::Local);
}

#[test]
fn sources_and_unsupported_architectures() {
    let c = config();
    for (name, source) in [
        ("hub", AdapterSource::Hub),
        ("local", AdapterSource::Local),
        ("s3", AdapterSource::S3),
    ] {
        let fields = AdapterFields {
            adapter_source: Some(name),
            ..named("a")
        };
        assert_eq!(resolve(&c, fields).unwrap().unwrap().key.source, source);
    }
    let bad = AdapterFields {
        adapter_source: Some("pbase"),
        ..named("a")
    };
    assert_eq!(
        resolve(&c, bad).unwrap_err(),
        E::AdapterSource("pbase".into())
    );
    let off = AdapterConfig {
        supports_adapters: false,
        ..config()
    };
    let err = resolve(&off, named("a")).unwrap_err();
    assert_eq!(
        err.to_string(),
        "architecture LlamaForCausalLM does not support dynamic adapter loading"
    );
    assert!(resolve(&off, AdapterFields::default()).unwrap().is_none());
}

#[test]
fn tokens_are_part_of_the_key_but_never_printed() {
    let c = config();
    let t1 = ApiToken::new("hf_secret_one");
    let t2 = ApiToken::new("hf_secret_two");
    let key = |token: Option<&ApiToken>| {
        let fields = AdapterFields {
            api_token: token,
            ..named("org/private")
        };
        resolve(&c, fields).unwrap().unwrap()
    };
    let (a, b, a2, none) = (key(Some(&t1)), key(Some(&t2)), key(Some(&t1)), key(None));
    assert_ne!(a.key, b.key);
    assert_eq!(a.key, a2.key);
    assert_ne!(a.key, none.key);
    assert!(a.key.is_private() && !none.key.is_private());
    assert_eq!(a.token().as_deref(), Some("hf_secret_one"));
    let printed = format!("{a:?} {:?} {}", a.key, a.key.describe());
    assert!(!printed.contains("hf_secret"), "{printed}");
    // An empty token is no token.
    assert_eq!(key(Some(&ApiToken::new(""))).key, none.key);
}

#[test]
fn merged_adapters_defaults_and_errors() {
    let m = MergedAdapters {
        ids: vec!["a".into(), "b".into()],
        ..Default::default()
    };
    let r = merged(&m).unwrap().unwrap();
    let p = r.key.to_proto();
    assert_eq!(p.weights, vec![1.0, 1.0]);
    assert_eq!(p.merge_strategy, "linear");
    assert_eq!(p.density, 1.0);
    assert_eq!(p.majority_sign_method, "total");
    assert_eq!(r.key.describe(), "a+b");

    let case = |f: fn(&mut MergedAdapters)| {
        let mut m = MergedAdapters {
            ids: vec!["a".into(), "b".into()],
            weights: Some(vec![0.5, 0.5]),
            ..Default::default()
        };
        f(&mut m);
        match merged(&m).unwrap_err() {
            E::MergedAdapters(message) => message,
            other => panic!("{other:?}"),
        }
    };
    assert!(case(|m| m.ids.clear()).contains("merged_adapters.ids"));
    assert!(case(|m| m.weights = Some(vec![1.0])).contains("1 value(s) for 2 adapter(s)"));
    assert!(case(|m| m.merge_strategy = Some("avg".into())).contains("merge_strategy"));
    assert!(case(|m| m.density = Some(0.0)).contains("density"));
    assert!(case(|m| m.density = Some(1.5)).contains("density"));
    assert!(case(|m| m.majority_sign_method = Some("x".into())).contains("sign_method"));
    assert!(case(|m| m.ids[1] = " ".into()).contains("non-blank"));
    let both = AdapterFields {
        merged_adapters: Some(&m),
        ..named("c")
    };
    assert_eq!(resolve(&config(), both).unwrap_err(), E::AdapterConflict);
    // Different merge settings are different adapters.
    let ties = MergedAdapters {
        merge_strategy: Some("ties".into()),
        density: Some(0.5),
        ..m.clone()
    };
    assert_ne!(merged(&ties).unwrap().unwrap().key, r.key);
}

#[test]
fn ids_are_bounded() {
    let long = "x".repeat(MAX_ADAPTER_ID_LENGTH + 1);
    assert!(matches!(
        resolve(&config(), named(&long)).unwrap_err(),
        E::AdapterId(_)
    ));
    // Characters, as the document's maxLength counts them: two-byte ones fit as many.
    let wide = "é".repeat(MAX_ADAPTER_ID_LENGTH);
    assert!(resolve(&config(), named(&wide)).is_ok());
    let wider = "é".repeat(MAX_ADAPTER_ID_LENGTH + 1);
    assert!(resolve(&config(), named(&wider)).is_err());
}

#[test]
fn a_merged_default_adapter_is_the_only_model() {
    let merged = AdapterConfig {
        default_adapter_id: Some("org/merged".into()),
        supports_adapters: false, // the shards report none once the adapter is merged
        merged: true,
        ..config()
    };
    assert!(merged.default_adapter().is_none(), "nothing to load");
    for fields in [
        AdapterFields::default(),
        named(""),
        named("org/base"),
        named("org/merged"),
    ] {
        assert!(resolve(&merged, fields).unwrap().is_none());
    }
    let other = resolve(&merged, named("org/other")).unwrap_err();
    assert!(
        other.to_string().contains("merged org/merged")
            && other.to_string().contains("--merge-adapter-weights"),
        "{other}"
    );
    let merges = MergedAdapters {
        ids: vec!["org/merged".into(), "org/other".into()],
        ..Default::default()
    };
    let fields = AdapterFields {
        merged_adapters: Some(&merges),
        ..Default::default()
    };
    assert!(resolve(&merged, fields).is_err());
}
