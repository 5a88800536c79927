"""The fixed everyday prompts `bench serve` sends and `bench learn` samples answers to (the first 16 are
serve's, all 32 learn's)."""

SERVE = [
    "What is a good way to start learning to cook?",
    "Give me three tips for sleeping better.",
    "How do I make a cup of green tea?",
    "What should I pack for a weekend trip to the beach?",
    "Explain what a budget is in simple words.",
    "How can I stay focused while working from home?",
    "What is a healthy breakfast I can make in five minutes?",
    "How often should I water a cactus?",
    "Suggest a fun activity for a rainy afternoon.",
    "How do I write a polite email to decline an invitation?",
    "What are some easy exercises I can do at my desk?",
    "How do I remove a coffee stain from a shirt?",
    "What is the difference between weather and climate?",
    "Give me an idea for a simple vegetarian dinner.",
    "How can I save money on groceries?",
    "What should I do if I feel stressed before an exam?",
]

LEARN = SERVE + [
    "What is a quick way to clean a microwave?",
    "How do I start running if I have never done it?",
    "What can I cook with rice, eggs and spinach?",
    "How do I keep my houseplants alive in winter?",
    "What are good questions to ask at a job interview?",
    "How can I make my mornings less rushed?",
    "Why do onions make people cry when cutting them?",
    "What is a good gift for a friend who likes books?",
    "How do I fold a fitted sheet neatly?",
    "What should I do when my phone battery drains fast?",
    "How can I learn new words in a foreign language?",
    "What is a simple way to organise my desk?",
    "How do I make a paper airplane that flies far?",
    "What are easy ways to drink more water each day?",
    "How long should I boil an egg for a soft yolk?",
    "What should I look for when buying a used bike?",
]
