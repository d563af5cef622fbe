//! Fits a two-layer GELU MLP to y = x·tanh(4x) with plain gradient descent on the CPU, printing
//! the mean squared error as it falls. `cargo run --release -p autograd --example fit_mlp`

use autograd::Var;
use tensor::{seeded_rng, DType, Tensor};

fn main() -> anyhow::Result<()> {
    let mut rng = seeded_rng(0);
    let (n, hidden) = (256, 64);
    let xs = Tensor::rand_uniform(&[n, 1], DType::F32, -1.0, 1.0, &mut rng)?;
    let ys = xs.affine(4.0, 0.0)?.tanh()?.mul(&xs)?;
    let (x, y) = (Var::constant(xs), Var::constant(ys));

    // Parameters live as plain tensors; each step wraps them in fresh leaf vars.
    let mut params = [
        Tensor::randn(&[1, hidden], DType::F32, 0.0, 1.0, &mut rng)?,
        Tensor::zeros(&[hidden], DType::F32),
        Tensor::randn(
            &[hidden, 1],
            DType::F32,
            0.0,
            1.0 / (hidden as f64).sqrt(),
            &mut rng,
        )?,
        Tensor::zeros(&[1], DType::F32),
    ];
    let lr = 0.1;
    for step in 0..=2000 {
        let vars: Vec<Var> = params.iter().cloned().map(Var::parameter).collect();
        let (w1, b1, w2, b2) = (&vars[0], &vars[1], &vars[2], &vars[3]);
        let h = x.matmul(w1)?.add(b1)?.gelu_erf()?;
        let loss = h.matmul(w2)?.add(b2)?.sub(&y)?.sqr()?.mean(&[0, 1], false)?;
        loss.backward()?;
        for (p, v) in params.iter_mut().zip(&vars) {
            let g = v.grad().expect("every parameter takes part in the loss");
            *p = p.sub(&g.affine(lr, 0.0)?)?;
        }
        if step % 250 == 0 {
            println!("step {step:4}  mse {:.6}", loss.value().to_scalar_f64()?);
        }
    }
    Ok(())
}
