// The kept weight preparations of kept.h: one process-wide list, most recently used first.
#include "kept.h"

#include <c10/util/intrusive_ptr.h>

#include <algorithm>
#include <limits>
#include <list>
#include <mutex>

#include "checks.h"

namespace fastaspp {

int64_t env_megabytes(const char* name, int64_t fallback) {
  const int64_t mb = checked_switch(IntegerSwitch{name, fallback, 0});
  return std::min(mb, std::numeric_limits<int64_t>::max() >> 20) << 20;
}

namespace {

// What must be unchanged for a kept copy of one weight to stay valid.
struct Stamp {
  c10::weak_intrusive_ptr<c10::TensorImpl, c10::UndefinedTensorImpl> owner;
  const c10::TensorImpl* impl;
  const void* data;
  int64_t version;

  explicit Stamp(const at::Tensor& t)
      : owner(t.getIntrusivePtr()), impl(t.unsafeGetTensorImpl()), data(t.data_ptr()), version(t._version()) {}
  bool matches(const at::Tensor& t) const {
    return impl == t.unsafeGetTensorImpl() && data == t.data_ptr() && version == t._version();
  }
};

struct Entry {
  std::vector<Stamp> stamps;
  std::vector<int64_t> tag;
  at::Tensor value;

  bool expired() const {
    for (const Stamp& s : stamps)
      if (s.owner.expired()) return true;
    return false;
  }
  bool matches(at::TensorList weights, const std::vector<int64_t>& key) const {
    if (tag != key || stamps.size() != weights.size()) return false;
    for (size_t i = 0; i < weights.size(); ++i)
      if (!stamps[i].matches(weights[i])) return false;
    return true;
  }
  // Whether it was made from one of `weights` before that weight changed (the same tensor at
  // another version or storage): it can never match again, whatever its tag.
  bool outdated_by(at::TensorList weights) const {
    for (const Stamp& s : stamps)
      for (const at::Tensor& w : weights)
        if (s.impl == w.unsafeGetTensorImpl() && !s.matches(w)) return true;
    return false;
  }
  int64_t bytes() const { return value.numel() * value.element_size(); }
};

std::mutex& kept_mutex() {
  static std::mutex mutex;
  return mutex;
}

std::list<Entry>& kept_entries() {
  static std::list<Entry> entries;
  return entries;
}

}  // namespace

at::Tensor kept(at::TensorList weights, const std::vector<int64_t>& tag, const std::function<at::Tensor()>& make) {
  for (const at::Tensor& w : weights)
    if (!keepable(w)) return make();
  {
    std::lock_guard<std::mutex> lock(kept_mutex());
    std::list<Entry>& entries = kept_entries();
    entries.remove_if([](const Entry& e) { return e.expired(); });
    for (auto it = entries.begin(); it != entries.end(); ++it) {
      if (it->matches(weights, tag)) {
        entries.splice(entries.begin(), entries, it);
        return it->value;
      }
    }
  }
  at::Tensor value = make();  // outside the lock: it may run parallel loops
  const c10::DeviceType device = value.device().type();
  const int64_t budget = device == c10::DeviceType::CPU ? env_megabytes("FASTASPP_CPU_KEPT_MB", 1024)
                                                        : env_megabytes("FASTASPP_CUDA_KEPT_MB", 1024);
  const int64_t bytes = value.numel() * value.element_size();
  if (bytes > budget) return value;
  std::lock_guard<std::mutex> lock(kept_mutex());
  std::list<Entry>& entries = kept_entries();
  // Entries made from older versions of these weights are stale for good, those of other
  // derivations (another layout, another stream's copy) included: drop them now, rather than
  // holding their memory until the budget evicts them.
  entries.remove_if([&](const Entry& e) { return e.outdated_by(weights); });
  // Each device type's copies count against its own budget; the least recently used go first.
  int64_t held = bytes;
  for (const Entry& e : entries)
    if (e.value.device().type() == device) held += e.bytes();
  for (auto it = entries.end(); held > budget && it != entries.begin();) {
    --it;
    if (it->value.device().type() != device) continue;
    held -= it->bytes();
    it = entries.erase(it);
  }
  Entry entry{{}, tag, value};
  for (const at::Tensor& w : weights) entry.stamps.emplace_back(w);
  entries.push_front(std::move(entry));
  return value;
}

int64_t kept_bytes(c10::DeviceType device) {
  std::lock_guard<std::mutex> lock(kept_mutex());
  int64_t held = 0;
  for (const Entry& e : kept_entries())
    if (e.value.device().type() == device) held += e.bytes();
  return held;
}

}  // namespace fastaspp
