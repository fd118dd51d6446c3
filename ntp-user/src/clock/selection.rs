//! Source selection (RFC 5905 §11.2): the intersection of correctness intervals rejects
//! falsetickers, clustering prunes outliers, and the survivors are combined weighted by root
//! distance.

/// Clustering never prunes below this many survivors (RFC 5905 NMIN).
const MIN_CLUSTER_SURVIVORS: usize = 3;

/// One upstream as selection sees it. Times in seconds.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    /// Index of the upstream (callers' identifier).
    pub id: usize,
    /// True − model.
    pub offset: f64,
    /// Root distance: half the total delay to the reference plus all dispersion and jitter.
    pub root_distance: f64,
    pub jitter: f64,
    pub stratum: u8,
    pub leap: u8,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Selection {
    /// Survivors, best (least root distance) first; the first is the system peer.
    pub survivors: Vec<usize>,
    /// Rejected by the intersection.
    pub falsetickers: Vec<usize>,
    /// Pruned by clustering (correct but noisier than the rest).
    pub outliers: Vec<usize>,
    /// Combined offset.
    pub offset: f64,
    /// Spread of the survivors around the system peer (RFC 5905 system jitter, selection part).
    pub jitter: f64,
    /// Leap indicator held by a majority of survivors (0 otherwise).
    pub leap: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SelectError {
    NoCandidates,
    /// No majority of intervals overlaps: nobody can be trusted.
    NoMajority {
        candidates: usize,
    },
    /// Fewer truechimers than the configured minimum.
    TooFewAgreeing {
        agreeing: usize,
        required: usize,
    },
}

impl std::fmt::Display for SelectError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SelectError::NoCandidates => write!(f, "no usable upstream"),
            SelectError::NoMajority { candidates } => {
                write!(f, "no majority of the {candidates} upstreams agree")
            }
            SelectError::TooFewAgreeing { agreeing, required } => {
                write!(f, "{agreeing} upstreams agree, {required} required")
            }
        }
    }
}

/// Marzullo's intersection as RFC 5905 §11.2.1 runs it: allow f falsetickers, f = 0, 1, ...
/// while they are a minority, and find the interval where n − f correctness intervals overlap.
fn intersection(cands: &[Candidate]) -> Option<(f64, f64)> {
    let n = cands.len();
    // (value, +1 entering / -1 leaving); ties: entering first, so touching intervals overlap.
    let mut edges: Vec<(f64, i32)> = cands
        .iter()
        .flat_map(|c| {
            [
                (c.offset - c.root_distance, 1),
                (c.offset + c.root_distance, -1),
            ]
        })
        .collect();
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut allow = 0;
    while 2 * allow < n {
        let need = (n - allow) as i32;
        let mut depth = 0;
        let mut low = None;
        let mut high = None;
        for &(v, e) in &edges {
            depth += e;
            if e == 1 && depth >= need && low.is_none() {
                low = Some(v);
            }
            if e == -1 && depth + 1 >= need && low.is_some() {
                high = Some(v);
            }
        }
        if let (Some(l), Some(h)) = (low, high) {
            if l <= h {
                return Some((l, h));
            }
        }
        allow += 1;
    }
    None
}

pub fn select(cands: &[Candidate], min_agreeing: usize) -> Result<Selection, SelectError> {
    if cands.is_empty() {
        return Err(SelectError::NoCandidates);
    }
    let (low, high) = intersection(cands).ok_or(SelectError::NoMajority {
        candidates: cands.len(),
    })?;
    let (mut truechimers, falsetickers): (Vec<Candidate>, Vec<Candidate>) = cands
        .iter()
        .partition(|c| c.offset - c.root_distance <= high && c.offset + c.root_distance >= low);
    if truechimers.len() < min_agreeing.max(1) {
        return Err(SelectError::TooFewAgreeing {
            agreeing: truechimers.len(),
            required: min_agreeing,
        });
    }
    // Order by quality: stratum, then root distance (RFC 5905 uses stratum × MAXDIST + λ).
    truechimers.sort_by(|a, b| {
        (a.stratum as f64 * 1.5 + a.root_distance)
            .total_cmp(&(b.stratum as f64 * 1.5 + b.root_distance))
    });

    // Clustering: drop the survivor whose offset is farthest from the others while that
    // spread exceeds the best survivor's own jitter.
    let mut outliers = Vec::new();
    while truechimers.len() > MIN_CLUSTER_SURVIVORS {
        let selection_jitter = |i: usize| {
            let oi = truechimers[i].offset;
            let sum: f64 = truechimers.iter().map(|c| (c.offset - oi).powi(2)).sum();
            (sum / (truechimers.len() - 1) as f64).sqrt()
        };
        let (worst, worst_jitter) = (0..truechimers.len())
            .map(|i| (i, selection_jitter(i)))
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .unwrap();
        let min_peer_jitter = truechimers
            .iter()
            .map(|c| c.jitter)
            .fold(f64::INFINITY, f64::min);
        if worst_jitter <= min_peer_jitter {
            break;
        }
        outliers.push(truechimers.remove(worst).id);
    }

    // Combine: weights 1 / root distance.
    let weights: Vec<f64> = truechimers
        .iter()
        .map(|c| 1.0 / c.root_distance.max(1e-9))
        .collect();
    let total: f64 = weights.iter().sum();
    let offset = truechimers
        .iter()
        .zip(&weights)
        .map(|(c, w)| c.offset * w)
        .sum::<f64>()
        / total;
    let peer_offset = truechimers[0].offset;
    let jitter = (truechimers
        .iter()
        .zip(&weights)
        .map(|(c, w)| w * (c.offset - peer_offset).powi(2))
        .sum::<f64>()
        / total)
        .sqrt();
    let mut leap_votes = [0usize; 4];
    for c in &truechimers {
        leap_votes[(c.leap & 3) as usize] += 1;
    }
    let leap = (1..3)
        .find(|&l| 2 * leap_votes[l] > truechimers.len())
        .unwrap_or(0) as u8;
    Ok(Selection {
        survivors: truechimers.iter().map(|c| c.id).collect(),
        falsetickers: falsetickers.iter().map(|c| c.id).collect(),
        outliers,
        offset,
        jitter,
        leap,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(id: usize, offset_ms: f64, dist_ms: f64) -> Candidate {
        Candidate {
            id,
            offset: offset_ms * 1e-3,
            root_distance: dist_ms * 1e-3,
            jitter: 1e-4,
            stratum: 2,
            leap: 0,
        }
    }

    #[test]
    fn a_falseticker_is_outvoted() {
        let cands = [
            c(0, 0.1, 5.0),
            c(1, -0.2, 5.0),
            c(2, 0.0, 4.0),
            c(3, 1000.0, 5.0),
        ];
        let s = select(&cands, 1).unwrap();
        assert_eq!(s.falsetickers, vec![3]);
        assert!(s.survivors.len() == 3 && !s.survivors.contains(&3));
        assert!(s.offset.abs() < 0.3e-3);
    }

    #[test]
    fn two_against_two_has_no_majority() {
        let cands = [
            c(0, 0.0, 1.0),
            c(1, 0.1, 1.0),
            c(2, 500.0, 1.0),
            c(3, 500.1, 1.0),
        ];
        assert_eq!(
            select(&cands, 1),
            Err(SelectError::NoMajority { candidates: 4 })
        );
    }

    #[test]
    fn minimum_agreeing_sources_is_enforced() {
        let cands = [c(0, 0.0, 1.0), c(1, 0.1, 1.0)];
        assert!(select(&cands, 2).is_ok());
        assert_eq!(
            select(&cands, 3),
            Err(SelectError::TooFewAgreeing {
                agreeing: 2,
                required: 3
            })
        );
    }

    #[test]
    fn combining_weights_by_root_distance() {
        // 1 ms off with distance 1 and 4 ms off with distance 4: weights 1 and 1/4.
        let cands = [c(0, 1.0, 1.0), c(1, 4.0, 4.0)];
        let s = select(&cands, 1).unwrap();
        assert!((s.offset - (1.0 + 4.0 / 4.0) / 1.25 * 1e-3).abs() < 1e-12);
        assert_eq!(s.survivors[0], 0);
    }

    #[test]
    fn clustering_prunes_the_noisy_one() {
        let mut cands = vec![
            c(0, 0.0, 10.0),
            c(1, 0.05, 10.0),
            c(2, -0.05, 10.0),
            c(3, 0.02, 10.0),
            c(4, 6.0, 10.0),
        ];
        for x in &mut cands {
            x.jitter = 1e-4;
        }
        let s = select(&cands, 1).unwrap();
        assert!(
            s.falsetickers.is_empty(),
            "6 ms is inside everyone's 10 ms interval"
        );
        assert_eq!(s.outliers, vec![4]);
    }

    #[test]
    fn leap_follows_the_majority() {
        let mut cands = vec![c(0, 0.0, 1.0), c(1, 0.0, 1.0), c(2, 0.0, 1.0)];
        cands[0].leap = 1;
        assert_eq!(select(&cands, 1).unwrap().leap, 0);
        cands[1].leap = 1;
        assert_eq!(select(&cands, 1).unwrap().leap, 1);
    }
}
