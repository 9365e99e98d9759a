"""Onboard MPC: short-horizon CEM / MPPI through the whole ensemble, bootstrapped with V(s).

Shapes: ``E`` members, ``N`` population (candidate sequences), ``k`` planning horizon, ``R``
action repeat, ``K = k * R`` model steps (control ticks), ``S`` observation dim, ``A`` action dim,
``C`` constraints.

The return of a candidate sequence ``a_0..a_{k-1}`` under member ``e`` is (per control tick ``t``)

    G_e = sum_{t < tau} gamma^t r_t  +  gamma^tau V(s_tau)

where ``tau = K`` normally and ``tau`` is the first tick whose ensemble disagreement exceeds the
threshold when truncation is on (the imagined return stops where the models stop agreeing). A
member whose trajectory terminates stops collecting reward and gets no tail. The score is the mean
of ``G_e`` over members minus penalties (constraint violations on any member, terminations,
disagreement, truncation). Everything is computed with masks over all ``K`` steps at once.

Failure semantics: ``plan`` never raises on non-finite model output. Candidates with non-finite
scores are never chosen while a finite one exists; if none is finite, the returned ``PlanInfo``
carries non-finite ``expected_return`` / ``predicted_obs`` and the gate falls back.

Performance (one thread, ``benchmarks/bench_plan.py``): the cost is ``iterations * K`` sequential
model calls at batch ``E x N`` through the model's lean ``stepper()`` (``predict`` for models without
one); at planning sizes each call is dominated by per-op dispatch, not FLOPs, so the horizon costs
far more than the population (the default swing-up config's figures: benchmarks/RESULTS.md).
Call ``torch.set_num_threads`` in the process, not here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from robot_mbrl.models.base import DynamicsModel
from robot_mbrl.models.ensemble import wrap_angle
from robot_mbrl.planning.base import PlanInfo
from robot_mbrl.tasks.base import Task
from robot_mbrl.typedconfig import param

log = logging.getLogger(__name__)

ValueFn = Callable[[torch.Tensor], torch.Tensor]  # E x N x S -> E x N
PriorPolicy = Callable[[torch.Tensor], torch.Tensor]  # M x S (angles unwrapped) -> M x A


@dataclass(frozen=True)
class PlannerConfig:
    method: str = param("cem", "sampling-based optimizer", choices=("cem", "mppi"))
    horizon: int = param(5, "planned steps k (each held for action_repeat ticks)", ge=1, le=100)
    population: int = param(16, "candidate sequences per iteration (N)", ge=2)
    iterations: int = param(2, "optimizer iterations per plan", ge=1)
    elites: int = param(4, "elite candidates refitting the sampling distribution", ge=1)
    temperature: float = param(0.5, "MPPI: weights exp((score - max) / temperature)", gt=0)
    momentum: float = param(0.1, "weight of the old mean/std in each refit (alpha)", ge=0, lt=1)
    init_std: float = param(0.3, "initial sampling std, fraction of the half action range", gt=0)
    noise_correlation: float = param(
        0.0,
        "correlation of the sampling noise between consecutive planned steps (AR(1), each step's "
        "marginal std unchanged): > 0 samples sustained pushes instead of per-step jitter",
        ge=0,
        lt=1,
    )
    min_std: float = param(0.05, "floor of the sampling std, fraction of the half range", ge=0)
    gamma: float = param(0.99, "discount per control tick (match the value function)", gt=0, le=1)
    action_repeat: int = param(1, "control ticks each planned action is held for", ge=1)
    disagreement_penalty: float = param(0.0, "score -= this * sum of disagreement over trusted steps", ge=0)
    exploration_bonus: float = param(
        0.0,
        "score += this * sum over trusted ticks of disagreement / threshold (each tick adds at most "
        "this); MPCAgent applies it in train's learning episodes only: seek what the model does not know",
        ge=0,
    )
    policy_candidate: bool = param(
        True,
        "when the agent has a feedback law (the LQR of value.terminal), candidate 1 of every "
        "iteration follows it through the ensemble: a guide the sampler rarely finds by itself",
    )
    disturbance_rate: float = param(
        0.0,
        "offset-free MPC: every imagined tick adds a constant disturbance, the exponential average "
        "(this rate per tick) of the recent one-step residuals (real next obs - model mean), so a "
        "model bias near an equilibrium does not become a steady drift (0: off)",
        ge=0,
        le=1,
    )
    truncation_penalty: float = param(0.0, "score -= this when a candidate's return is truncated", ge=0)
    constraint_penalty: float = param(
        10.0, "score -= this per tick where any member violates g(x) <= 0", ge=0
    )
    termination_penalty: float = param(10.0, "score -= this * fraction of members that terminate", ge=0)
    truncate_on_disagreement: bool = param(True, "stop the imagined return at the first over-threshold tick")
    shift_fill: str = param(
        "last", "warm-start shift: repeat the last action or append zero", choices=("last", "zero")
    )
    seed: int = param(0, "seed of the planner's sampling generator")

    def validate(self) -> None:
        if self.elites > self.population:
            raise ValueError(f"elites ({self.elites}) must be <= population ({self.population})")
        if self.min_std > self.init_std:
            raise ValueError(f"min_std ({self.min_std}) must be <= init_std ({self.init_std})")


@dataclass
class _Rollout:
    """Everything one iteration computed, kept to fill PlanInfo for its best candidate."""

    cand: torch.Tensor  # k x N x A
    states: torch.Tensor  # (K+1) x E x N x S
    disagreement: torch.Tensor  # K x N
    margins: torch.Tensor  # K x E x N x C
    ret: torch.Tensor  # E x N, masked discounted reward sum (no tail)
    tail: torch.Tensor  # E x N, gamma^tau V(s_tau) (0 where the member terminated)
    tau: torch.Tensor  # N, truncation tick (K when not truncated)
    penalty: torch.Tensor  # N, constraint/termination/disagreement/truncation penalties


class MPCPlanner:
    """Receding-horizon planner: ``plan(obs, warm_start, threshold) -> PlanInfo`` each tick.

    ``value_fn`` maps ``E x N x S`` states to ``E x N`` values (None: tail 0). ``reward_source``
    is ``"task"`` (the task's known reward) or ``"model"`` (``Prediction.reward``).
    """

    def __init__(
        self,
        model: DynamicsModel,
        task: Task,
        action_low: np.ndarray,
        action_high: np.ndarray,
        value_fn: ValueFn | None = None,
        config: PlannerConfig | None = None,
        reward_source: str = "task",
        prior: PriorPolicy | None = None,
    ):
        if reward_source not in ("task", "model"):
            raise ValueError(f"reward_source: expected 'task' or 'model', got {reward_source!r}")
        self.cfg = cfg = config or PlannerConfig()
        cfg.validate()
        self.model, self.task, self.value_fn, self.reward_source = model, task, value_fn, reward_source
        self.prior = prior
        self._prior_slot = torch.tensor([1])  # plan(): candidate 1 follows the prior
        self.disturbance: torch.Tensor | None = None  # S, added to every imagined tick
        self.low = torch.as_tensor(np.asarray(action_low, dtype=np.float32)).reshape(-1)
        self.high = torch.as_tensor(np.asarray(action_high, dtype=np.float32)).reshape(-1)
        if self.low.shape != self.high.shape or not bool((self.low <= self.high).all()):
            raise ValueError("action bounds: low and high must have the same shape and low <= high")
        k, n, a = cfg.horizon, cfg.population, self.low.numel()
        self.num_ticks = k * cfg.action_repeat
        half = (self.high - self.low) / 2
        self.center = (self.high + self.low) / 2
        self.std0 = (cfg.init_std * half).expand(k, a).contiguous()  # k x A
        self.std_min = (cfg.min_std * half).expand(k, a).contiguous()  # k x A
        self.discount = cfg.gamma ** torch.arange(self.num_ticks + 1, dtype=torch.float32)  # K+1
        self.noise = torch.empty(k, n, a)  # reused sampling buffer
        # AR(1) noise along the horizon as one matmul: Cholesky factor of rho^|i-j| (k x k)
        rho = cfg.noise_correlation
        lags = torch.arange(k, dtype=torch.float64)
        self.noise_mix = (
            torch.linalg.cholesky(rho ** (lags[:, None] - lags[None, :]).abs()).float() if rho > 0 else None
        )
        self.gen = torch.Generator().manual_seed(cfg.seed)
        mask = getattr(model, "angle_mask", None)  # angle channels (wrapped once per rollout)
        self.angle_mask = (
            None if mask is None or not bool(torch.as_tensor(mask).any()) else torch.as_tensor(mask)
        )

    def _stepper(
        self,
    ) -> Callable[
        [torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
    ]:
        """The model call for one rollout: ``E x N x S``, ``E x N x A`` -> next obs, disagreement ``N``
        (None: the model's ``spread`` of the whole rollout), reward or None. The model's lean
        ``stepper()`` when it has one (weights bound once per plan, angles left unwrapped), else the
        :class:`DynamicsModel` ``predict`` contract."""
        make = getattr(self.model, "stepper", None)
        if make is not None:
            return make(spread=not hasattr(self.model, "spread"))

        def predict(obs: torch.Tensor, act: torch.Tensor):
            pred = self.model.predict(obs, act)
            return pred.mean, pred.disagreement, pred.reward

        return predict

    def observe_residual(self, next_obs: np.ndarray, mean: np.ndarray) -> None:
        """Offset-free MPC (``disturbance_rate``): fold one real transition's residual (real next
        obs - model mean, ``S``; angles wrapped, clipped to 3 x the model's per-tick delta scale so
        one glitch cannot steer) into the exponential average :attr:`disturbance`."""
        rate = self.cfg.disturbance_rate
        r = torch.as_tensor(np.asarray(next_obs, float) - np.asarray(mean, float), dtype=torch.float32)
        if rate <= 0 or not bool(torch.isfinite(r).all()):
            return
        if self.angle_mask is not None:
            r = torch.where(self.angle_mask, wrap_angle(r), r)
        scale = getattr(self.model, "state_scale", None)
        if scale is not None:
            r = torch.clamp(r, -3.0 * scale.detach(), 3.0 * scale.detach())
        old = self.disturbance
        self.disturbance = rate * r if old is None else old + rate * (r - old)

    def reset(self, seed: int | None = None) -> None:
        """Restart the sampling generator (``seed`` defaults to the config's)."""
        self.gen.manual_seed(self.cfg.seed if seed is None else seed)

    def shift(self, actions: torch.Tensor) -> torch.Tensor:
        """Warm start for the next tick: ``k x A`` -> ``k x A``, first action dropped, the last
        repeated (``shift_fill='last'``) or zero clipped to the bounds (``'zero'``)."""
        last = actions[-1:] if self.cfg.shift_fill == "last" else torch.zeros_like(actions[-1:])
        return torch.cat([actions[1:], last.clamp(self.low, self.high)])

    @torch.no_grad()  # not inference_mode: PlanInfo tensors stay ordinary (editable) tensors
    def plan(
        self,
        obs: np.ndarray,
        warm_start: torch.Tensor | None = None,
        disagreement_threshold: float | None = None,
    ) -> PlanInfo:
        """Optimize a ``k x A`` action sequence from observation ``obs`` (``S``).

        ``warm_start``: ``k x A`` (e.g. ``shift(prev.actions)``), None starts at the bound centre.
        ``disagreement_threshold``: truncate imagined returns where the disagreement exceeds it
        (None or ``truncate_on_disagreement=False``: never truncate).
        """
        t_start = time.perf_counter()
        cfg = self.cfg
        s0 = torch.tensor(np.asarray(obs, dtype=np.float32)).reshape(-1)  # a copy: obs may be read-only
        threshold = disagreement_threshold if cfg.truncate_on_disagreement else None
        # 1. initial sampling distribution: warm start (non-finite entries -> centre), wide std
        mean = self.center.expand(cfg.horizon, -1).clone()
        if warm_start is not None:
            ws = torch.as_tensor(warm_start, dtype=torch.float32).reshape(cfg.horizon, -1)
            mean = torch.where(torch.isfinite(ws), ws, mean).clamp(self.low, self.high)
        std = self.std0.clone()
        best: tuple[float, _Rollout, int] | None = None
        for _ in range(cfg.iterations):
            # 2. sample N sequences around the mean (candidate 0 is the mean itself), clip to bounds
            torch.randn(self.noise.shape, generator=self.gen, out=self.noise)
            if self.noise_mix is not None:
                self.noise = (self.noise_mix @ self.noise.view(cfg.horizon, -1)).view_as(self.noise)
            cand = torch.addcmul(mean.unsqueeze(1), std.unsqueeze(1), self.noise)
            cand = cand.clamp_(self.low, self.high)
            cand[:, 0] = mean
            # 3. roll every candidate through every member at once, score with masks
            # (candidate 1 follows the prior feedback policy, when there is one)
            slots = None if self.prior is None else self._prior_slot
            roll = self._rollout(s0, cand, threshold, prior_slots=slots, disturbance=self.disturbance)
            score = self._score(roll)  # N
            # 4. remember the best evaluated candidate (its trajectory is what we report)
            top = torch.topk(score, cfg.elites)
            if best is None or float(top.values[0]) > best[0]:
                best = (float(top.values[0]), roll, int(top.indices[0]))
            # 5. refit the sampling distribution to the elites (CEM: mean/std, MPPI: weighted)
            elite = cand[:, top.indices]  # k x M x A
            if cfg.method == "cem":
                new_mean, new_std = elite.mean(1), elite.std(1, unbiased=False)
            else:
                w = torch.softmax((top.values - top.values[0]) / cfg.temperature, 0).view(1, -1, 1)
                new_mean = (w * elite).sum(1)
                new_std = ((w * (elite - new_mean.unsqueeze(1)) ** 2).sum(1)).sqrt()
            mean = cfg.momentum * mean + (1 - cfg.momentum) * new_mean
            std = (cfg.momentum * std + (1 - cfg.momentum) * new_std).clamp(self.std_min, self.std0)
        assert best is not None
        info = self._plan_info(best[1], best[2])
        info.solve_time_s = time.perf_counter() - t_start
        return info

    def _rollout(
        self,
        s0: torch.Tensor,
        cand: torch.Tensor,
        threshold: float | None,
        value_fn: ValueFn | None = None,
        prior_slots: torch.Tensor | None = None,
        disturbance: torch.Tensor | None = None,
    ) -> _Rollout:
        """Propagate ``cand`` (``k x N x A``) from ``s0`` (``S``, or ``N x S``: one start per
        candidate) through all members. ``value_fn`` overrides the planner's tail; it may return
        ``H x E x N`` (one value per head), and then ``tail`` is ``H x E x N`` too. ``prior_slots``
        (``M`` indices into ``N``): these candidates follow the prior policy on their member-mean state instead
        (their actions are written into ``cand``, clipped to the bounds). ``disturbance`` (``S``) is
        added to every predicted tick."""
        cfg, e, n, ticks = self.cfg, self.model.num_members, cand.shape[1], self.num_ticks
        state = s0.expand(e, n, -1)
        states, dis, rews = [state], [], []
        step = self._stepper()
        fb = self.prior is not None and prior_slots is not None and len(prior_slots) > 0
        # one candidate (plan()): the prior's float path, if it has one, instead of ~10 tensor ops a
        # tick (in this loop, between model calls, Python floats beat tensor and numpy ops: +0.3 ms
        # per plan for the candidate instead of +0.9, benchmarks/RESULTS.md)
        one = getattr(self.prior, "one", None) if fb and len(prior_slots) == 1 else None
        if one is not None:
            slot, cand_np = int(prior_slots[0]), cand.numpy()
            bounds = list(zip(self.low.tolist(), self.high.tolist(), strict=True))
        for t in range(ticks):
            if one is not None and t % cfg.action_repeat == 0:
                mean = [sum(col) / e for col in zip(*state[:, slot].tolist(), strict=True)]  # over members
                cand_np[t // cfg.action_repeat, slot] = [
                    min(max(a, lo), hi) for a, (lo, hi) in zip(one(mean), bounds, strict=True)
                ]
            elif fb and t % cfg.action_repeat == 0:
                a_fb = self.prior(state.index_select(1, prior_slots).mean(0))  # M x A
                cand[t // cfg.action_repeat].index_copy_(0, prior_slots, a_fb.clamp(self.low, self.high))
            act = cand[t // cfg.action_repeat].expand(e, -1, -1)  # E x N x A
            state, d, rew = step(state, act)
            if disturbance is not None:
                state = state + disturbance
            states.append(state)
            dis.append(d)
            if self.reward_source == "model":
                if rew is None:
                    raise ValueError("reward_source='model' but the model has no reward head")
                rews.append(rew)
        traj = torch.stack(states)  # (K+1) x E x N x S
        d = self.model.spread(traj[1:]) if dis[0] is None else torch.stack(dis)  # K x N
        if self.angle_mask is not None:  # the model's stepper leaves angles continuous
            traj = torch.where(self.angle_mask, wrap_angle(traj), traj)
        acts = cand.repeat_interleave(cfg.action_repeat, 0) if cfg.action_repeat > 1 else cand
        acts = acts.unsqueeze(1).expand(-1, e, -1, -1)  # K x E x N x A
        if self.reward_source == "task":
            r = self.task.reward(traj[:-1], acts, traj[1:])  # K x E x N
        else:
            r = torch.stack(rews)
        term = self.task.terminated(traj[1:])  # K x E x N
        g = self.task.constraints(traj[1:])  # K x E x N x C
        # trusted ticks: no over-threshold disagreement at or before t (tau = count of trusted)
        if threshold is None:
            trusted = torch.ones_like(d, dtype=torch.bool)
        else:
            trusted = (d > threshold).cumsum(0) == 0  # K x N (NaN disagreement counts as trusted)
        tau = trusted.sum(0)  # N
        # alive[t]: the member has not terminated before tick t (t = 0..K)
        alive = torch.cat([torch.ones_like(term[:1]), term.cumsum(0) == 0])  # (K+1) x E x N
        use = trusted.unsqueeze(1) & alive[:-1]  # K x E x N
        ret = (torch.where(use, r, 0.0) * self.discount[:-1].view(-1, 1, 1)).sum(0)  # E x N
        # bootstrap gamma^tau V(s_tau) where the member is still alive at tau
        idx = tau.view(1, 1, n).expand(1, e, n)
        alive_tau = alive.gather(0, idx)[0]  # E x N
        tail = torch.zeros_like(ret)
        value_fn = self.value_fn if value_fn is None else value_fn
        if value_fn is not None:
            s_tau = traj.gather(0, idx.unsqueeze(-1).expand(1, e, n, traj.shape[-1]))[0]
            tail = torch.where(alive_tau, self.discount[tau] * value_fn(s_tau), 0.0)
        pen = self._penalties(d, trusted, term & use, g)
        if cfg.exploration_bonus > 0:
            scale = threshold if threshold is not None and threshold > 0 else 1.0
            bonus = torch.where(trusted, torch.nan_to_num(d, nan=0.0) / scale, 0.0).clamp(max=1.0).sum(0)
            pen = pen - cfg.exploration_bonus * bonus
        return _Rollout(cand, traj, d, g, ret, tail, tau, pen)

    def _penalties(
        self, d: torch.Tensor, trusted: torch.Tensor, died: torch.Tensor, g: torch.Tensor
    ) -> torch.Tensor:
        """Per-candidate penalty ``N`` from disagreement ``K x N``, trust ``K x N``, terminations
        ``K x E x N`` (within trusted, alive ticks) and margins ``K x E x N x C``."""
        cfg = self.cfg
        pen = torch.zeros(d.shape[1])
        if cfg.constraint_penalty > 0 and g.shape[-1] > 0:
            violated = (g > 0).any(-1).any(1) & trusted  # K x N
            pen += cfg.constraint_penalty * violated.sum(0)
        if cfg.termination_penalty > 0:
            pen += cfg.termination_penalty * died.any(0).float().mean(0)
        if cfg.disagreement_penalty > 0:
            pen += cfg.disagreement_penalty * torch.where(trusted, d, 0.0).sum(0)
        if cfg.truncation_penalty > 0:
            pen += cfg.truncation_penalty * (~trusted[-1]).float()
        return pen

    def _score(self, roll: _Rollout) -> torch.Tensor:
        """``N`` scores: member-mean return minus penalties; non-finite -> -1e30 (never chosen)."""
        score = (roll.ret + roll.tail).mean(0) - roll.penalty
        return torch.nan_to_num(score, nan=-1e30, posinf=-1e30, neginf=-1e30)

    def _plan_info(self, roll: _Rollout, b: int) -> PlanInfo:
        """PlanInfo for candidate ``b`` of ``roll``, per planned step (max over repeated ticks)."""
        k, r = self.cfg.horizon, self.cfg.action_repeat
        e = roll.states.shape[1]
        actions = roll.cand[:, b].clone()  # k x A
        dis = roll.disagreement[:, b].view(k, r).amax(1)  # k
        margins = roll.margins[:, :, b].reshape(k, r, e, -1).amax(1)  # k x E x C
        tau = int(roll.tau[b])
        info = PlanInfo(
            action=actions[0].numpy().copy(),
            actions=actions,
            predicted_obs=roll.states[::r, :, b].clone(),  # (k+1) x E x S
            disagreement=dis,
            constraint_margins=margins,
            value_tail=float(roll.tail[:, b].mean()),
            expected_return=float((roll.ret[:, b] + roll.tail[:, b]).mean()),
            truncated_at=None if tau >= self.num_ticks else tau // r,
            solve_time_s=0.0,  # set by plan()
        )
        if not np.isfinite(info.expected_return):
            log.warning("planner: non-finite return estimate (model output not finite)")
        return info
