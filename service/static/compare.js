// Compare mode of the chat page: 2 to 4 answers to one message, side by side.
// One click on "X is best" (or "X is better" with two) sends a choice: {chosen, rejected}. With 3 or 4
// answers the user can instead rank them all, by keyboard (Move up / Move down) or by pointer (drag an
// answer in the list), and send the ranking: {ranking: [best, ..., worst]}. Either way the conversation
// goes on from the answer put first. app.js hands in its helpers; nothing here talks to the page otherwise.
"use strict";

window.thumbtuneCompare = ({ h, icon, post, friendly, askForKey, FEEDBACK_URL }) => {
  const PLACES = ["1st", "2nd", "3rd", "4th"];
  const NUMBERS = ["", "One", "Two", "Three", "Four"];

  function title(n) {
    return n === 2 ? "Two answers. Which one is better?" : `${NUMBERS[n]} answers. Pick the best, or rank them all.`;
  }

  // The list a ranking is made in: one item per answer, best first. Returns {el, order(), lock(on)}.
  function rankPanel(cards, announce) {
    const list = h("ol", { class: "rank-list", "aria-label": "Your ranking, best first" });
    const items = cards.map((card) => {
      const up = h("button", { type: "button", class: "btn btn-small rank-move", "aria-label": `Move ${card.label} up`,
        text: "↑" });
      const down = h("button", { type: "button", class: "btn btn-small rank-move",
        "aria-label": `Move ${card.label} down`, text: "↓" });
      const item = h("li", { class: "rank-item", draggable: "true", "data-label": card.label },
        h("span", { class: "rank-place", "aria-hidden": "true" }),
        h("span", { class: "rank-name", text: `Answer ${card.label}` }), up, down);
      item.card = card;
      up.addEventListener("click", () => move(item, -1, up));
      down.addEventListener("click", () => move(item, 1, down));
      return item;
    });
    list.append(...items);

    function order() {
      return [...list.children];
    }

    function refresh() {
      order().forEach((item, i) => {
        item.querySelector(".rank-place").textContent = PLACES[i];
        const [up, down] = item.querySelectorAll(".rank-move");
        up.disabled = i === 0 || list.dataset.locked === "true";
        down.disabled = i === items.length - 1 || list.dataset.locked === "true";
      });
    }

    function placed(item) {
      announce(`Answer ${item.dataset.label} is now ${PLACES[order().indexOf(item)]}.`);
    }

    function move(item, delta, button) {
      const at = order().indexOf(item);
      const to = at + delta;
      if (to < 0 || to >= items.length) return;
      const sibling = order()[to];
      if (delta < 0) sibling.before(item);
      else sibling.after(item);
      refresh();
      placed(item);
      // keep the focus with the answer moved; at an end its button is disabled, so use the other one
      (button.disabled ? item.querySelector(`.rank-move:not(:disabled)`) : button).focus();
    }

    // Pointer: drag an item onto another to put it there (above it when dragged upward, else below).
    let dragged = null;
    list.addEventListener("dragstart", (event) => {
      dragged = event.target.closest(".rank-item");
      if (!dragged || list.dataset.locked === "true") return event.preventDefault();
      event.dataTransfer.effectAllowed = "move";
      event.dataTransfer.setData("text/plain", dragged.dataset.label);
      dragged.classList.add("dragging");
    });
    list.addEventListener("dragover", (event) => {
      if (dragged) event.preventDefault();
    });
    list.addEventListener("drop", (event) => {
      const target = event.target.closest(".rank-item");
      event.preventDefault();
      if (!dragged || !target || target === dragged) return;
      if (order().indexOf(dragged) > order().indexOf(target)) target.before(dragged);
      else target.after(dragged);
      refresh();
      placed(dragged);
    });
    list.addEventListener("dragend", () => {
      if (dragged) dragged.classList.remove("dragging");
      dragged = null;
    });

    refresh();
    return {
      el: list,
      order: () => order().map((item) => item.card),
      lock(on) {
        list.dataset.locked = String(on);
        for (const item of items) item.draggable = !on;
        refresh();
      },
    };
  }

  // The rating controls under the answers of one compare turn; `entry` is the history slot to update.
  function compareBar(turn, cards, entry) {
    const status = h("p", { class: "fb-status", role: "status" });
    const word = cards.length === 2 ? "better" : "best";
    const buttons = cards.map((card) => {
      const button = h("button", { type: "button", class: "btn btn-choose", "aria-pressed": "false" },
        icon("up"), h("span", { text: `${card.label} is ${word}` }));
      card.el.append(button);
      return button;
    });
    const ranking = cards.length > 2 ? rankPanel(cards, (text) => { status.textContent = text; }) : null;
    const sendRanking = ranking ? h("button", { type: "button", class: "btn btn-primary btn-small",
      text: "Send ranking" }) : null;

    function lock(on) {
      for (const b of buttons) b.disabled = on;
      if (ranking) {
        ranking.lock(on);
        sendRanking.disabled = on;
      }
    }

    async function rate(payload, first, thanks, mark) {
      lock(true);
      status.className = "fb-status";
      status.textContent = "Sending…";
      try {
        await post(FEEDBACK_URL, payload);
        mark();
        entry.content = first.text; // the conversation goes on from the answer put first
        status.textContent = `Thanks! ${thanks}; the conversation goes on from it.`;
      } catch (err) {
        if (err.status === 401) {
          lock(false);
          status.textContent = "";
          askForKey(err, () => rate(payload, first, thanks, mark));
          return;
        }
        status.className = "fb-status error";
        status.textContent = friendly(err, "rate");
        if (err.status !== 404 && err.status !== 409) lock(false);
      }
    }

    function choose(i) {
      const best = cards[i];
      const others = cards.filter((card) => card !== best).map((card) => card.responseId);
      const payload = { chosen: best.responseId, rejected: others.length === 1 ? others[0] : others };
      const thanks = cards.length === 2 ? `You preferred answer ${best.label}` : `You picked answer ${best.label} as the best`;
      rate(payload, best, thanks, () => {
        buttons[i].setAttribute("aria-pressed", "true");
        best.meta.append(h("span", { class: "badge badge-good", text: "Preferred" }));
        for (const card of cards) card.el.classList.add(card === best ? "chosen" : "rejected");
        turn.dataset.chosen = best.label;
      });
    }

    buttons.forEach((b, i) => b.addEventListener("click", () => choose(i)));
    if (!ranking) return status;

    sendRanking.addEventListener("click", () => {
      const ordered = ranking.order();
      const labels = ordered.map((card) => card.label);
      rate({ ranking: ordered.map((card) => card.responseId) }, ordered[0],
        `You ranked ${labels.join(", ")}, best first`, () => {
          ordered.forEach((card, place) => {
            card.meta.append(h("span", { class: place === 0 ? "badge badge-good" : "badge badge-muted",
              text: PLACES[place] }));
          });
          ordered[0].el.classList.add("chosen");
          turn.dataset.ranking = labels.join(",");
        });
    });
    return h("div", { class: "rank-wrap" },
      h("section", { class: "rank-panel", "aria-label": "Rank the answers" },
        h("p", { class: "rank-help", text: "Or rank them all, best first: move an answer with its arrows, or drag it." }),
        ranking.el, sendRanking),
      status);
  }

  return { title, compareBar };
};
