use super::*;
pub struct DpmPp2M;
impl DpmPp2M { pub fn new(_c: &SchedulerConfig, _n: usize, _k: bool) -> Result<Self> { todo!() } }
impl Scheduler for DpmPp2M {
    fn timesteps(&self) -> &[f64] { todo!() }
    fn init_noise_sigma(&self) -> f64 { todo!() }
    fn scale_model_input(&self, _s: &Tensor, _i: usize) -> Result<Tensor> { todo!() }
    fn step(&mut self, _m: &Tensor, _i: usize, _s: &Tensor, _r: &mut NoiseRng) -> Result<Tensor> { todo!() }
    fn add_noise(&self, _o: &Tensor, _n: &Tensor, _i: usize) -> Result<Tensor> { todo!() }
}
