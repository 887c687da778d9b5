"""The ranking model's time-aware item term (model.item_time, #17): the items'
recent purchases and age as of each row's day, so that a model knows what
sells this week, and a checkpoint from before the term scores as it did."""
import numpy as np
import torch

from deltarec.models import build_model
from deltarec.models.item_clock import NEVER
from deltarec.models.ranking import TIME_STATE

U, I = 40, 12


def ranking(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model("ranking", user_buckets=U, item_buckets=I, embedding_dim=4, hidden=[8],
                       history_length=0, **kw)


def test_checkpoint_without_the_time_term_scores_as_before():
    old = ranking(item_time=False)
    with torch.no_grad():
        for p in old.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    state = old.state_dict()
    assert not set(TIME_STATE) & set(state)
    new = ranking(seed=3)  # today's default: with the term
    new.load_state_dict(state)  # strict: the term comes back at zero, the clock empty
    assert not new.item_time.weight.any()
    assert int(new.clock.as_of) == -1 and bool((new.clock.first_day == NEVER).all())
    users, items = torch.arange(U), torch.arange(I)
    b = {"user_idx": users % U, "item_idx": users % I, "event_day": torch.full((U,), 15_000)}
    torch.testing.assert_close(new.eval()(b), old.eval()(b))
    torch.testing.assert_close(new.score_all(users, items), old.score_all(users, items))
    # the next night folds its purchases into the empty clock: it starts from them, not from 1970
    new.clock.advance(rows=np.array([2, 2, 5]), days=np.array([15_000, 15_001, 15_001]), signs=np.ones(3))
    assert int(new.clock.as_of) == 15_002 and int(new.clock.first_day[2]) == 15_000
    assert int(new.clock.first_day[0]) == NEVER


def trend_rows(seed=0):
    """Days 0..13: item 0 sells most on days 0..9, item 1 on days 10..13 (item 0
    still the most bought over the whole period); every other purchase and
    the negatives uniform. Returns the batch and the purchases (item, day)."""
    rng = np.random.default_rng(seed)
    users, items, days, labels = [], [], [], []
    bought = []
    for d in range(14):
        hot = 0 if d < 10 else 1
        for _ in range(30):
            u = int(rng.integers(U - 10))  # the last 10 users never buy: scored as strangers
            i = hot if rng.random() < 0.6 else int(rng.integers(2, I))
            bought.append((i, d))
            users.append(u), items.append(i), days.append(d), labels.append(1.0)
            for j in rng.integers(0, I, size=2):  # negatives: uniform items, the same day
                users.append(u), items.append(int(j)), days.append(d), labels.append(0.0)
    base = 15_000  # day numbers since 1970
    b = {"user_idx": torch.tensor(users), "item_idx": torch.tensor(items),
         "event_day": torch.tensor(days) + base, "label": torch.tensor(labels)}
    return b, np.array([i for i, _ in bought]), np.array([d for _, d in bought]) + base


def train(m, b, steps=300):
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(m(b), b["label"]).backward()
        opt.step()
    return m.eval()


def test_the_clock_lets_the_model_rank_this_weeks_item_first():
    """Over the whole period item 0 sold most; in the last days item 1 does.
    Scoring the next day, the model with the clock puts item 1 first for
    customers it knows nothing about; the same model without the clock,
    trained on the same rows, ranks by what sold overall (item 0)."""
    b, bought, bought_days = trend_rows()
    assert (bought == 0).sum() > 2 * (bought == 1).sum()  # item 0 is the all-time best seller
    timed = ranking()
    timed.clock.advance(rows=bought, days=bought_days, signs=np.ones(len(bought)))  # as the trainer does
    # training reads each row's own day: item 1 is cold on day 5, hot on day 13, whatever the clock's end
    one, early, late = torch.tensor([1]), torch.tensor([15_005]), torch.tensor([15_013])
    assert timed.clock.features(one, early)[0, 0] < timed.clock.features(one, late)[0, 0]
    timed = train(timed, b)
    timed.clock.end_training()
    plain = train(ranking(item_time=False), b)
    assert timed.item_time.weight.abs().sum() > 0  # it learned to read the clock
    users, items = torch.arange(U - 10, U), torch.arange(I)
    with torch.no_grad():
        s_timed, s_plain = timed.score_all(users, items), plain.score_all(users, items)
    assert (s_timed[:, 1] > s_timed[:, 0]).float().mean() > 0.9  # this week's item first
    assert (s_plain[:, 0] > s_plain[:, 1]).float().mean() > 0.9  # the all-time best seller first
