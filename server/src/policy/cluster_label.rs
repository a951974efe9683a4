//! `--cluster-label CLUSTER=KEY=VALUE`: labels of clusters for policies'
//! `matchLabels`, given on the command line.

use tunnel_identity::spiffe as identity;

/// One `--cluster-label`: a label of a cluster for policies' `matchLabels`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterLabel {
    /// The cluster.
    pub cluster: String,
    /// The label's key.
    pub key: String,
    /// The label's value.
    pub value: String,
}

/// A `--cluster-label` that does not parse; the message starts with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterLabelError {
    /// Not of the form CLUSTER=KEY=VALUE.
    #[error("{label:?}: expected CLUSTER=KEY=VALUE")]
    Form {
        /// The flag's value.
        label: String,
    },
    /// The cluster is no valid cluster name.
    #[error("{label:?}: {source}")]
    Cluster {
        /// The flag's value.
        label: String,
        /// What is wrong with the name.
        #[source]
        source: identity::IdentityError,
    },
    /// The key is empty.
    #[error("{label:?}: the label key is empty")]
    EmptyKey {
        /// The flag's value.
        label: String,
    },
}

/// Parses `--cluster-label CLUSTER=KEY=VALUE`.
pub fn parse_cluster_label(s: &str) -> Result<ClusterLabel, ClusterLabelError> {
    let form = || ClusterLabelError::Form {
        label: s.to_owned(),
    };
    let (cluster, kv) = s.split_once('=').ok_or_else(form)?;
    let (key, value) = kv.split_once('=').ok_or_else(form)?;
    identity::validate_cluster_name(cluster).map_err(|source| ClusterLabelError::Cluster {
        label: s.to_owned(),
        source,
    })?;
    if key.is_empty() {
        return Err(ClusterLabelError::EmptyKey {
            label: s.to_owned(),
        });
    }
    Ok(ClusterLabel {
        cluster: cluster.to_owned(),
        key: key.to_owned(),
        value: value.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_labels_parse() {
        assert_eq!(
            parse_cluster_label("east=env=prod").unwrap(),
            ClusterLabel {
                cluster: "east".into(),
                key: "env".into(),
                value: "prod".into()
            }
        );
        // A value may hold '='.
        assert_eq!(parse_cluster_label("east=k=a=b").unwrap().value, "a=b");
        assert!(matches!(
            parse_cluster_label("east=env"),
            Err(ClusterLabelError::Form { .. })
        ));
        let err = parse_cluster_label("East=env=prod").unwrap_err();
        assert!(matches!(err, ClusterLabelError::Cluster { .. }), "{err}");
        assert!(err.to_string().starts_with("\"East=env=prod\": "), "{err}");
        assert!(matches!(
            parse_cluster_label("east==prod"),
            Err(ClusterLabelError::EmptyKey { .. })
        ));
    }
}
