"""A small English text the built-in tokenizer is trained on. Written for this project."""

CORPUS = """\
The river ran past the old mill, and the miller counted the sacks of flour before the sun went down.
In the morning the children walked to school along the stone wall, talking about the storm.
A good recipe needs patience: warm the butter, stir in the flour, and add the milk a little at a time.
The library opened at nine, and the first visitor asked for a book about the history of ships.
She wrote a letter to her brother, who worked on a farm three valleys to the north.
Every evening the lighthouse keeper climbed the stairs and cleaned the great glass lens.
The market was busy on Saturday; people bought apples, bread, cheese, honey, and fresh fish.
When the train stopped at the small station, a man with a blue umbrella stepped onto the platform.
Mathematics is the study of numbers, shapes, patterns, and the rules that connect them.
A computer follows instructions one step at a time, but it can take billions of steps each second.
The garden needed water, so the old woman carried two buckets from the well every afternoon.
Birds flew south when the air turned cold, and the fields were covered with frost by November.
The teacher asked the class to read the poem aloud and to explain what the last line meant.
Good software is tested often, written clearly, and changed in small steps that are easy to review.
The mountain road was narrow and steep, with a wall of rock on one side and a long drop on the other.
He played the piano every night after dinner, slowly at first, then faster as the notes came back.
The cat slept on the warm windowsill while the rain tapped softly against the glass.
Scientists measured the temperature of the lake each week and wrote the numbers in a notebook.
A question is often more useful than an answer, because it shows what we do not yet understand.
The baker woke before dawn to light the oven, shape the loaves, and sweep the floor of the shop.
On the coast the wind was strong, and the waves threw white foam high against the harbour wall.
The museum kept old maps, coins, tools, and letters that told the story of the town.
Please answer the question briefly and politely, and say so if you do not know the answer.
The assistant listened carefully, thought about the request, and replied with a short, helpful answer.
Hello! How can I help you today? I can explain ideas, summarise text, or answer simple questions.
Thank you for your message. Here is a short summary of the main points you asked about.
The weather today is mild and sunny, with a light breeze from the west and a few clouds later.
Water boils at one hundred degrees Celsius at sea level, and freezes at zero degrees.
The sun is a star, and the earth travels around it once every year, about three hundred sixty five days.
A week has seven days: Monday, Tuesday, Wednesday, Thursday, Friday, Saturday, and Sunday.
The numbers one, two, three, four, five, six, seven, eight, nine, and ten are easy to learn.
Servers answer requests from clients; a queue holds the requests that are waiting for their turn.
A model reads a prompt, predicts the next token, adds it to the text, and repeats until it stops.
The cache keeps recent results close at hand, so the same work does not have to be done twice.
When the power went out, the family lit candles, played cards, and told stories until midnight.
The farmer planted wheat in spring, watched it grow all summer, and harvested it in the autumn.
Travelers crossed the desert at night, guided by the stars and the memory of older journeys.
The doctor listened to the patient's heart, checked his breathing, and wrote a short prescription.
In the quiet forest a fox followed the path of a rabbit through the snow and the fallen leaves.
Music, painting, and writing are ways people share what they see, feel, and remember.
The engineer checked every bolt on the bridge before the first trucks were allowed to cross it.
Time is measured in seconds, minutes, hours, days, weeks, months, and years.
Colors of the rainbow are red, orange, yellow, green, blue, indigo, and violet.
The small boat drifted across the bay while the fisherman mended his nets in the morning light.
Reading every day builds a large vocabulary and makes it easier to learn new subjects later.
The city council met on Tuesday to discuss new bus routes, bicycle lanes, and a larger park.
A kind word at the right moment can change the whole mood of a difficult day.
The climbers reached the summit at noon, took a photograph, and began the long walk down.
Tea or coffee? Most mornings she chose tea, with a slice of toast and a little marmalade.
Winter evenings were long, so the village gathered in the hall for songs, soup, and old jokes.
The chemist mixed two clear liquids, and the glass turned a deep purple that surprised everyone.
Our neighbour repairs bicycles in his garage; he knows every spoke, chain, gear, and brake cable.
Clouds gathered over the hills, thunder rolled across the valley, and heavy rain soaked the orchards.
The orchestra tuned its violins, cellos, flutes, trumpets, and drums before the conductor arrived.
An honest report describes what was measured, how it was measured, and what remains uncertain.
The kitchen smelled of cinnamon, ginger, roasted garlic, lemon peel, and freshly ground pepper.
Engineers design machines, bridges, circuits, networks, and programs that people rely on daily.
During the festival, lanterns floated on the canal and dancers wore costumes of silver and gold.
The puppy chased its tail, knocked over a vase, and then fell asleep under the kitchen table.
Geography describes continents, oceans, rivers, deserts, glaciers, volcanoes, and islands.
A careful writer revises drafts, removes needless words, and checks every quotation twice.
The goalkeeper jumped, stretched, and caught the ball just before it crossed the line.
Quietly, the astronomer adjusted the telescope and recorded the position of a faint comet.
Vegetables such as carrots, potatoes, onions, cabbages, beans, and peppers grew in neat rows.
Hospitals need nurses, surgeons, pharmacists, cleaners, cooks, and volunteers working together.
The journey from the capital to the northern province took three days by horse and wagon.
Jazz musicians improvise melodies, responding to each other's rhythms with surprising freedom.
Fresh snow muffled the streets; only the scrape of shovels broke the silence of the morning.
Languages borrow words from one another, and dictionaries grow thicker with every generation.
Please summarise the following paragraph in one sentence, keeping the most important facts.
Translate the phrase into French, then explain the grammar behind each word you chose.
Write a short poem about autumn leaves, using gentle rhymes and vivid, colourful imagery.
Sorry, I cannot help with that request, but I can suggest a few safer alternatives instead.
Zebras, giraffes, elephants, lions, hippos, and crocodiles gathered near the muddy waterhole.
Thirty-two students submitted their projects: robots, volcano models, solar ovens, and kites.
The judge weighed the evidence, listened to both lawyers, and announced her decision calmly.
Quantum physics explains particles that behave like waves, which puzzled even famous thinkers.
Breakfast included porridge with raisins, scrambled eggs, orange juice, and strong black coffee.
"""
