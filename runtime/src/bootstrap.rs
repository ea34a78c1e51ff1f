//! One table lookup on a ciphertext: keyswitch to the small key, centred modulus switch,
//! blind rotation, sample extraction.

use tfhe::core_crypto::fft_impl::fft64::math::fft::Fft;
use tfhe::core_crypto::prelude::*;

/// Per-thread scratch for lookups: FFT plan, stack memory, the keyswitched ciphertext and
/// the accumulator being rotated. Made once per worker, reused for every lookup it runs.
pub struct Bootstrapper {
    fft: Fft,
    buffers: ComputationBuffers,
    small: LweCiphertextOwned<u64>,
    rotated: GlweCiphertextOwned<u64>,
}

impl Bootstrapper {
    pub fn new(ksk: &LweKeyswitchKeyOwned<u64>, bsk: &FourierLweBootstrapKeyOwned) -> Bootstrapper {
        let fft = Fft::new(bsk.polynomial_size());
        let mut buffers = ComputationBuffers::new();
        buffers.resize(
            blind_rotate_assign_mem_optimized_requirement::<u64>(bsk.glwe_size(), bsk.polynomial_size(), fft.as_view())
                .unaligned_bytes_required(),
        );
        Bootstrapper {
            fft,
            buffers,
            small: LweCiphertext::new(
                0u64,
                ksk.output_key_lwe_dimension().to_lwe_size(),
                CiphertextModulus::new_native(),
            ),
            rotated: GlweCiphertext::new(0u64, bsk.glwe_size(), bsk.polynomial_size(), CiphertextModulus::new_native()),
        }
    }

    /// Keyswitch `input` (large key) to the small key; the result stays in `self.small`.
    pub fn keyswitch(&mut self, ksk: &LweKeyswitchKeyOwned<u64>, input: &LweCiphertextView<'_, u64>) {
        keyswitch_lwe_ciphertext(ksk, input, &mut self.small);
    }

    /// Take a ciphertext already under the small key as the bootstrap's input.
    pub fn load_small(&mut self, input: &LweCiphertextView<'_, u64>) {
        self.small.as_mut().copy_from_slice(input.as_ref());
    }

    /// The keyswitched ciphertext (for noise measurements).
    pub fn small(&self) -> &LweCiphertextOwned<u64> {
        &self.small
    }

    /// Bootstrap the keyswitched ciphertext through `accumulator` into `out`.
    ///
    /// The modulus switch to 2N is centred (tfhe's `lwe_ciphertext_centered_binary_modulus_switch`):
    /// the server knows each mask element's rounding error e_i, and with a binary key their
    /// expected contribution is Σe_i/2, so the body absorbs it before rounding. This halves
    /// the modulus-switch noise for free — no extra key material — which is what lets 5-bit
    /// lookups run at N = 2048 instead of 4096. The body is also shifted by half a rotation
    /// step so the error is centred on the half-box-rotated table tfhe builds.
    pub fn bootstrap(
        &mut self,
        bsk: &FourierLweBootstrapKeyOwned,
        accumulator: &GlweCiphertextOwned<u64>,
        out: &mut LweCiphertextOwned<u64>,
    ) {
        self.rotated.as_mut().copy_from_slice(accumulator.as_ref());
        let log_modulus = bsk.polynomial_size().to_blind_rotation_input_modulus_log();
        let switched =
            lwe_ciphertext_centered_binary_modulus_switch::<u64, usize, _>(self.small.as_view(), log_modulus);
        blind_rotate_assign_mem_optimized(&switched, &mut self.rotated, bsk, self.fft.as_view(), self.buffers.stack());
        extract_lwe_sample_from_glwe_ciphertext(&self.rotated, out, MonomialDegree(0));
    }

    /// After [`Bootstrapper::bootstrap`]: the same rotation read half a turn further, the
    /// second function of a table whose upper half holds one (see `LookupInstr::second`).
    pub fn second_half(&self, out: &mut LweCiphertextOwned<u64>) {
        let half = self.rotated.polynomial_size().0 / 2;
        extract_lwe_sample_from_glwe_ciphertext(&self.rotated, out, MonomialDegree(half));
    }
}
