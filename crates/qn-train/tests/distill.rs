//! Distillation: the loss against the formula written out in f64, its gradient against the closed
//! form, the teacher-logit cache, and a run that learns from a teacher without labels.

use candle_core::{DType, Device, Tensor, Var};
use qn_train::data::Dataset;
use qn_train::distill::{cached_teacher_logits, distill_loss, teacher_logits, Distill};
use qn_train::mlp::Mlp;
use qn_train::trainer::{accuracy, run_stages, RunOutput, StagePlan, TrainConfig};

const STUDENT: [[f64; 3]; 2] = [[1.0, 2.0, -0.5], [0.3, -1.2, 0.8]];
const TEACHER: [[f64; 3]; 2] = [[0.5, 0.0, 1.0], [2.0, -0.4, 0.1]];
const LABELS: [u32; 2] = [1, 0];

fn softmax(z: &[f64], t: f64) -> Vec<f64> {
    let m = z.iter().cloned().fold(f64::MIN, f64::max);
    let e: Vec<f64> = z.iter().map(|v| ((v - m) / t).exp()).collect();
    let s: f64 = e.iter().sum();
    e.iter().map(|v| v / s).collect()
}

/// `α·CE + (1 − α)·T²·KL(p_t ‖ p_s)`, averaged over rows, written out in f64.
fn by_hand(alpha: f64, t: f64) -> f64 {
    let mut total = 0.0;
    for r in 0..2 {
        let ps = softmax(&STUDENT[r], t);
        let pt = softmax(&TEACHER[r], t);
        let kl: f64 = pt.iter().zip(&ps).map(|(a, b)| a * (a / b).ln()).sum();
        let ce = -softmax(&STUDENT[r], 1.0)[LABELS[r] as usize].ln();
        total += alpha * ce + (1.0 - alpha) * t * t * kl;
    }
    total / 2.0
}

fn tensor(rows: [[f64; 3]; 2]) -> Tensor {
    let flat: Vec<f32> = rows.iter().flatten().map(|v| *v as f32).collect();
    Tensor::from_vec(flat, (2, 3), &Device::Cpu).unwrap()
}

#[test]
fn the_loss_matches_the_formula_written_out() {
    let labels = Tensor::new(&LABELS, &Device::Cpu).unwrap();
    for (alpha, t) in [(0.0, 1.0), (0.0, 2.0), (0.3, 2.0), (0.5, 4.0), (1.0, 3.0)] {
        let d = Distill {
            alpha,
            temperature: t,
        };
        let got = distill_loss(&tensor(STUDENT), &tensor(TEACHER), &labels, &d)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want = by_hand(alpha, t);
        assert!(
            (got - want).abs() < 1e-5 * want.abs().max(1.0),
            "alpha {alpha}, T {t}: {got} against {want}"
        );
    }
    // A student equal to its teacher has no soft loss.
    let same = distill_loss(
        &tensor(TEACHER),
        &tensor(TEACHER),
        &labels,
        &Distill {
            alpha: 0.0,
            temperature: 3.0,
        },
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    assert!(same.abs() < 1e-6, "{same}");
}

/// d/ds of `(1 − α)·T²·KL(p_t ‖ softmax(s/T))` averaged over n rows is `(1 − α)·T·(p_s − p_t) / n`;
/// of `α·CE` it is `α·(softmax(s) − onehot) / n`.
#[test]
fn the_gradient_matches_the_closed_form() {
    let (alpha, t) = (0.25, 2.5);
    let s = Var::from_tensor(&tensor(STUDENT)).unwrap();
    let labels = Tensor::new(&LABELS, &Device::Cpu).unwrap();
    let loss = distill_loss(
        s.as_tensor(),
        &tensor(TEACHER),
        &labels,
        &Distill {
            alpha,
            temperature: t,
        },
    )
    .unwrap();
    let g = loss.backward().unwrap();
    let got = g.get(s.as_tensor()).unwrap().to_vec2::<f32>().unwrap();
    for r in 0..2 {
        let (ps, pt, p1) = (
            softmax(&STUDENT[r], t),
            softmax(&TEACHER[r], t),
            softmax(&STUDENT[r], 1.0),
        );
        for c in 0..3 {
            let onehot = if LABELS[r] as usize == c { 1.0 } else { 0.0 };
            let want = ((1.0 - alpha) * t * (ps[c] - pt[c]) + alpha * (p1[c] - onehot)) / 2.0;
            assert!(
                (got[r][c] as f64 - want).abs() < 1e-6,
                "row {r} class {c}: {} against {want}",
                got[r][c]
            );
        }
    }
}

#[test]
fn bad_settings_and_shapes_are_refused() {
    for (alpha, t, field) in [
        (-0.1, 1.0, "alpha"),
        (1.5, 1.0, "alpha"),
        (f64::NAN, 1.0, "alpha"),
        (0.0, 0.0, "temperature"),
        (0.0, f64::INFINITY, "temperature"),
    ] {
        let e = Distill {
            alpha,
            temperature: t,
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains(field), "{e}");
    }
    let labels = Tensor::new(&LABELS, &Device::Cpu).unwrap();
    let two = Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
    let e = distill_loss(&tensor(STUDENT), &two, &labels, &Distill::default())
        .unwrap_err()
        .to_string();
    assert!(e.contains("teacher logits") && e.contains("[2, 2]"), "{e}");
    let data = Dataset::new(tensor(STUDENT), labels);
    assert!(data.with_teacher(two.narrow(0, 0, 1).unwrap()).is_err());
}

/// Two Gaussian blobs per class in 8 dimensions.
fn blobs(n: usize, seed: u64) -> Dataset {
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    for i in 0..n {
        let c = (i % 3) as u32;
        for d in 0..8 {
            let centre = if d as u32 % 3 == c { 2.0 } else { 0.0 };
            x.push(centre + rng.random_range(-1.0f32..1.0));
        }
        y.push(c);
    }
    Dataset::new(
        Tensor::from_vec(x, (n, 8), &Device::Cpu).unwrap(),
        Tensor::from_vec(y, n, &Device::Cpu).unwrap(),
    )
}

/// A teacher trained on labels; a fresh student trained on the teacher's logits alone (labels
/// scrambled, so that any use of them would show) comes to agree with it.
#[test]
fn a_student_learns_from_the_teacher_alone() {
    let dev = Device::Cpu;
    let data = blobs(384, 1);
    let mut teacher = Mlp::seeded(8, 32, 3, 0, &dev).unwrap();
    let cfg = TrainConfig {
        batch_size: 32,
        lr: 1e-2,
        ..TrainConfig::default()
    };
    run_stages(
        &mut teacher,
        &data,
        &data,
        &StagePlan::float(150),
        &cfg,
        &RunOutput::default(),
    )
    .unwrap();
    let teacher_acc = accuracy(&teacher, &data, 128).unwrap();
    assert!(teacher_acc > 0.9, "teacher {teacher_acc}");
    let logits = teacher_logits(&teacher, &data, 100).unwrap();
    assert_eq!(logits.dims(), &[384, 3]);
    let scrambled = Tensor::zeros(384, DType::U32, &dev).unwrap();
    let unlabelled = Dataset::new(data.x.clone(), scrambled)
        .with_teacher(logits.clone())
        .unwrap();
    let mut student = Mlp::seeded(8, 32, 3, 7, &dev).unwrap();
    let cfg = TrainConfig {
        distill: Some(Distill {
            alpha: 0.0,
            temperature: 2.0,
        }),
        ..cfg
    };
    run_stages(
        &mut student,
        &unlabelled,
        &data,
        &StagePlan::float(150),
        &cfg,
        &RunOutput::default(),
    )
    .unwrap();
    let student_acc = accuracy(&student, &data, 128).unwrap();
    assert!(
        student_acc > teacher_acc - 0.05,
        "student {student_acc} against teacher {teacher_acc}"
    );
    // Without a teacher in the data, a distilling run is refused up front.
    let e = run_stages(
        &mut student,
        &data,
        &data,
        &StagePlan::float(1),
        &cfg,
        &RunOutput::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("distill"), "{e}");
}

#[test]
fn teacher_logits_are_cached_under_a_key_of_teacher_and_data() {
    let dev = Device::Cpu;
    let dir = tempfile::tempdir().unwrap();
    let data = blobs(50, 2);
    let teacher = Mlp::seeded(8, 16, 3, 0, &dev).unwrap();
    let (a, cached) = cached_teacher_logits(&teacher, &data, None, Some(dir.path()), 16).unwrap();
    assert!(!cached);
    let (b, cached) = cached_teacher_logits(&teacher, &data, None, Some(dir.path()), 7).unwrap();
    assert!(cached, "the second call reads the cache");
    assert_eq!(a.to_vec2::<f32>().unwrap(), b.to_vec2::<f32>().unwrap());
    // Another teacher, or other rows: computed again, not read.
    let other = Mlp::seeded(8, 16, 3, 1, &dev).unwrap();
    let (c, cached) = cached_teacher_logits(&other, &data, None, Some(dir.path()), 16).unwrap();
    assert!(!cached);
    assert_eq!(
        c.to_vec2::<f32>().unwrap(),
        teacher_logits(&other, &data, 16)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap()
    );
    let fewer = blobs(49, 2);
    let (_, cached) = cached_teacher_logits(&other, &fewer, None, Some(dir.path()), 16).unwrap();
    assert!(!cached);
    // A corrupt cache is recomputed, not trusted.
    std::fs::write(dir.path().join(qn_train::distill::TEACHER_CACHE), b"junk").unwrap();
    let (d, cached) = cached_teacher_logits(&other, &fewer, None, Some(dir.path()), 16).unwrap();
    assert!(!cached);
    assert_eq!(d.dim(0).unwrap(), 49);
    // Only the rows a run reads: those rows' logits, zeros elsewhere, cached apart.
    let rows = fewer.rows_drawn(3, 8, 1).unwrap();
    assert_eq!(rows.len(), 24);
    let (e, cached) =
        cached_teacher_logits(&other, &fewer, Some(&rows), Some(dir.path()), 16).unwrap();
    assert!(!cached);
    let (e2, cached) =
        cached_teacher_logits(&other, &fewer, Some(&rows), Some(dir.path()), 5).unwrap();
    assert!(cached);
    let (e, e2, d) = (
        e.to_vec2::<f32>().unwrap(),
        e2.to_vec2::<f32>().unwrap(),
        d.to_vec2::<f32>().unwrap(),
    );
    assert_eq!(e, e2);
    for r in 0..49 {
        if rows.contains(&(r as u32)) {
            // Other batches, so another GEMM blocking: equal up to rounding.
            for (a, b) in e[r].iter().zip(&d[r]) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "row {r}: {:?} against {:?}",
                    e[r],
                    d[r]
                );
            }
        } else {
            assert!(e[r].iter().all(|v| *v == 0.0), "row {r}");
        }
    }
}

/// The rows a run draws are exactly the union of its batches.
#[test]
fn rows_drawn_are_the_union_of_the_batches() {
    let data = blobs(50, 3);
    for (steps, batch) in [(1, 8), (6, 8), (7, 8), (20, 8), (3, 64), (0, 4)] {
        let mut want: Vec<u32> = (0..steps)
            .flat_map(|s| data.batch_indices(s, batch, 9).unwrap())
            .collect();
        want.sort_unstable();
        want.dedup();
        assert_eq!(
            data.rows_drawn(steps, batch, 9).unwrap(),
            want,
            "{steps} x {batch}"
        );
    }
}

/// Two Linear layers that show their hidden state (what an encoder shows layer by layer).
struct Shown {
    fc1: qn_train::layers::QLinear,
    fc2: qn_train::layers::QLinear,
}

impl Shown {
    fn seeded(seed: u64) -> Shown {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut layer = |name: &str, i: usize, o: usize| {
            let w: Vec<f32> = (0..o * i).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let w = Var::from_tensor(&Tensor::from_vec(w, (o, i), &Device::Cpu).unwrap()).unwrap();
            qn_train::layers::QLinear::new(name, w, None).unwrap()
        };
        Shown {
            fc1: layer("fc1", 8, 16),
            fc2: layer("fc2", 16, 3),
        }
    }
}

impl qn_train::QuantModel for Shown {
    fn forward_t(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        Ok(self.forward_hidden_t(x, train)?.unwrap().0)
    }
    fn forward_hidden_t(
        &self,
        x: &Tensor,
        train: bool,
    ) -> candle_core::Result<Option<(Tensor, Vec<Tensor>)>> {
        use candle_core::ModuleT;
        let h = self.fc1.forward_t(x, train)?.tanh()?;
        Ok(Some((self.fc2.forward_t(&h, train)?, vec![h])))
    }
    fn layers(&self) -> Vec<&dyn qn_train::layers::QuantNoiseLayer> {
        vec![&self.fc1, &self.fc2]
    }
    fn layers_mut(&mut self) -> Vec<&mut dyn qn_train::layers::QuantNoiseLayer> {
        vec![&mut self.fc1, &mut self.fc2]
    }
}

#[test]
fn hidden_mse_is_the_mean_over_layers_of_the_mean_squared_difference() {
    use qn_train::distill::hidden_mse;
    let t = |v: Vec<f32>, n| Tensor::from_vec(v, n, &Device::Cpu).unwrap();
    let hs = [t(vec![1.0, 2.0], 2), t(vec![0.0, 0.0, 3.0], 3)];
    let ht = [t(vec![0.0, 4.0], 2), t(vec![1.0, 0.0, 0.0], 3)];
    // Layer 1: (1 + 4) / 2 = 2.5; layer 2: (1 + 0 + 9) / 3 = 10/3; mean (2.5 + 10/3) / 2.
    let got = hidden_mse(&hs, &ht).unwrap().to_scalar::<f32>().unwrap() as f64;
    let want = (2.5 + 10.0 / 3.0) / 2.0;
    assert!((got - want).abs() < 1e-6, "{got} vs {want}");
    assert!(hidden_mse(&hs, &ht[..1]).is_err());
    assert!(hidden_mse(&[], &[]).is_err());
}

/// A student trained with the hidden-state term ends closer to the teacher's hidden states than
/// the same run without it; a run that asks for it without a teacher, or on a model that shows
/// no hidden states, is refused.
#[test]
fn the_hidden_term_pulls_the_students_states_to_the_teachers() {
    use qn_train::trainer::run_stages_with_teacher;
    use qn_train::QuantModel;
    let data = blobs(256, 3);
    let teacher = Shown::seeded(1);
    let logits = teacher_logits(&teacher, &data, 64).unwrap();
    let data = data.with_teacher(logits).unwrap();
    let gap = |s: &Shown| -> f64 {
        let (_, hs) = s.forward_hidden_t(&data.x, false).unwrap().unwrap();
        let (_, ht) = teacher.forward_hidden_t(&data.x, false).unwrap().unwrap();
        qn_train::distill::hidden_mse(&hs, &ht)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64
    };
    let run = |beta: f64| -> f64 {
        let mut student = Shown::seeded(2);
        let cfg = TrainConfig {
            batch_size: 32,
            lr: 1e-2,
            distill: Some(Distill::default()),
            hidden_distill: beta,
            ..TrainConfig::default()
        };
        run_stages_with_teacher(
            &mut student,
            Some(&teacher),
            &data,
            &data,
            &StagePlan::float(60),
            &cfg,
            &RunOutput::default(),
        )
        .unwrap();
        gap(&student)
    };
    let (start, without, with) = (gap(&Shown::seeded(2)), run(0.0), run(1.0));
    assert!(
        with < 0.5 * without && with < 0.5 * start,
        "hidden gap: start {start}, logits only {without}, with the hidden term {with}"
    );
    let cfg = TrainConfig {
        distill: Some(Distill::default()),
        hidden_distill: 1.0,
        ..TrainConfig::default()
    };
    let refused = |teacher: Option<&dyn QuantModel>, student: &mut dyn QuantModel| {
        run_stages_with_teacher(
            student,
            teacher,
            &data,
            &data,
            &StagePlan::float(1),
            &cfg,
            &RunOutput::default(),
        )
        .unwrap_err()
        .to_string()
    };
    let e = refused(None, &mut Shown::seeded(2));
    assert!(e.contains("needs a teacher"), "{e}");
    let e = refused(
        Some(&teacher),
        &mut Mlp::seeded(8, 16, 3, 0, &Device::Cpu).unwrap(),
    );
    assert!(
        e.contains("must expose the same number of hidden states"),
        "{e}"
    );
}
