// Host model of the TMA conv kernel's pipeline (csrc/cuda/conv_tma.cuh), run by
// tests/test_cuda_host_programs.py without a GPU. The kernel's producer warp and its consumer warps
// (8 on the 128 x 256 tile, 4 on the 64 x 128 one, each with its config's stage bytes) run as the
// kernel writes them, with its StageRing, against a model of mbarriers (a phase completes when its
// arrivals are in and, for a full barrier, its transaction bytes have landed; try_wait.parity P
// passes once the phase of parity P has completed, i.e. while the current phase's parity differs
// from P), in random interleavings, the TMA loads landing at random later times and each
// consumer's wgmma reading its stage from its issue until the wait<1> of the next step. Checked:
// every run finishes (no wait that never passes), a consumer reads each step's own boxes, and no
// load lands in a stage a wgmma may still be reading; over 2, 3 and the kernel's 8 stages and walks
// shorter and longer than the ring (and one stage, which must deadlock).
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/cuda/conv_tma.cuh"

using fastaspp::atrous_cuda::StageRing;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b, long long c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld, %lld)\n", what, a, b, c);
}

struct MBarrier {
  int count = 1, pending = 1, tx = 0;
  long long completed = 0;  // phases completed
  void init(int arrivals) { count = pending = arrivals; }
  void maybe_complete() {
    if (pending == 0 && tx == 0) ++completed, pending = count;
  }
  void arrive() { --pending, maybe_complete(); }
  void arrive_and_expect_tx(int bytes) { tx += bytes, --pending, maybe_complete(); }
  void complete_tx(int bytes) { tx -= bytes, maybe_complete(); }
  bool passes(uint32_t parity) const { return static_cast<uint32_t>(completed & 1) != parity; }
};

// Runs one CTA's pipeline of S stages, kWarps consumer warps and kBytes a stage to its end; false when it
// stopped with work left (a wait that never passes).
template <int S, int kWarps, int kBytes>
static bool run(int steps, std::mt19937& gen) {
  std::vector<MBarrier> full(S), empty(S);
  for (int s = 0; s < S; ++s) full[s].init(1), empty[s].init(kWarps);
  std::vector<int> landed(S, -1);  // the step whose boxes a stage holds
  struct Load {
    int stage, step;
  };
  std::vector<Load> in_flight;
  // The producer: at step `p`, about to wait (if it refills) then issue.
  StageRing<S> producer;
  int p = 0;
  // The consumers: each at step c[w]; reading[w] the steps whose wgmma may still read their stage.
  std::vector<StageRing<S>> ring(kWarps);
  std::vector<int> c(kWarps, 0), previous(kWarps, 0);
  std::vector<std::vector<int>> reading(kWarps);
  auto stage_read = [&](int stage) {
    for (int w = 0; w < kWarps; ++w)
      for (int step : reading[w])
        if (step % S == stage) return true;
    return false;
  };
  for (long long moves = 0;; ++moves) {
    // What may move now: the producer (its wait passes), a load landing, a consumer (its wait passes).
    std::vector<int> movable;  // 0: producer, 1 + w: consumer w, 100 + i: load i lands
    const bool released = !producer.refill() || empty[producer.stage].passes(producer.empty_parity());
    if (p < steps && released) movable.push_back(0);
    for (int w = 0; w < kWarps; ++w)
      if (c[w] < steps && full[ring[w].stage].passes(ring[w].full_parity())) movable.push_back(1 + w);
    for (size_t i = 0; i < in_flight.size(); ++i) movable.push_back(100 + static_cast<int>(i));
    if (movable.empty()) break;
    const int who = movable[std::uniform_int_distribution<size_t>(0, movable.size() - 1)(gen)];
    if (who == 0) {
      full[producer.stage].arrive_and_expect_tx(kBytes);
      in_flight.push_back({producer.stage, p});
      producer.advance();
      ++p;
    } else if (who >= 100) {
      const Load load = in_flight[who - 100];
      in_flight.erase(in_flight.begin() + (who - 100));
      expect(!stage_read(load.stage), "a load lands where no wgmma reads (stage, step, steps)", load.stage, load.step,
             steps);
      landed[load.stage] = load.step;
      full[load.stage].complete_tx(kBytes);
    } else {
      const int w = who - 1, stage = ring[w].stage;
      expect(landed[stage] == c[w], "a consumer reads its step's boxes (warp, step, held)", w, c[w], landed[stage]);
      reading[w].push_back(c[w]);                            // the wgmma, issued
      if (reading[w].size() > 1) reading[w].erase(reading[w].begin());  // wait<1>: the one before is done
      if (c[w] > 0) empty[previous[w]].arrive();
      previous[w] = stage;
      ring[w].advance();
      ++c[w];
      if (c[w] == steps) reading[w].clear();  // wait<0> after the loop
    }
  }
  bool done = p == steps && in_flight.empty();
  for (int w = 0; w < kWarps; ++w) done = done && c[w] == steps;
  return done;
}

template <int S, int kWarps, int kBytes>
static void run_all(std::mt19937& gen) {
  for (int steps : {0, 1, S - 1, S, S + 1, 2 * S, 3 * S + 2, 40})
    for (int trial = 0; trial < 30; ++trial)
      expect(run<S, kWarps, kBytes>(steps, gen), "the pipeline finishes (stages, steps, warps)", S, steps, kWarps);
}

// A config's pipeline as the kernel runs it: its stages, consumer warps and stage bytes; and over 2
// and 3 stages.
template <typename Config>
static void run_config(std::mt19937& gen) {
  constexpr int kWarps = Config::kMmaThreads / 32;
  run_all<2, kWarps, Config::kStageBytes>(gen);
  run_all<3, kWarps, Config::kStageBytes>(gen);
  run_all<Config::kStages, kWarps, Config::kStageBytes>(gen);
}

int main() {
  std::mt19937 gen(20261201);
  // One stage cannot work: a stage is released one step after its read, by consumers that first wait
  // for the next step's fill into that same stage. The model must find that wait (its own check).
  expect(!run<1, 8, 24576>(2, gen), "one stage deadlocks", 1, 2, 0);
  run_config<fastaspp::atrous_cuda::Sm90TmaConfig<__nv_bfloat16>>(gen);
  run_config<fastaspp::atrous_cuda::Sm90TmaNarrowConfig<__nv_bfloat16>>(gen);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
